"""Device backends: one module per device, imported only when used.

Adding a device means adding one module that defines `BACKEND` (its compile options, target checks and
artifact files included) and one line here, so a machine without a vendor SDK still runs every other device.
"""

from __future__ import annotations

from tasks.backends.base import Backend
from tasks.core.registry import Registry

BACKENDS: Registry[Backend] = Registry(
    "device",
    {
        "ort_cpu": "tasks.backends.ort_cpu:BACKEND",
        "openvino_cpu": "tasks.backends.openvino_cpu:BACKEND",
        "openvino_npu": "tasks.backends.openvino_npu:BACKEND",
        "qnn_htp": "tasks.backends.qnn_htp:BACKEND",
    },
)


def get_backend(name: str) -> Backend:
    return BACKENDS.get(name)
