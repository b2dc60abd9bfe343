"""Device backends: one module per device, imported only when used.

Adding a device means adding one module that defines `BACKEND` and one line here, so a machine
without a vendor SDK still runs every other device.
"""

from __future__ import annotations

import importlib

from tasks.backends.base import Backend

BACKEND_MODULES = {
    "ort_cpu": "tasks.backends.ort_cpu",
    "openvino_cpu": "tasks.backends.openvino_cpu",
    "openvino_npu": "tasks.backends.openvino_npu",
    "qnn_htp": "tasks.backends.qnn_htp",
}


def get_backend(name: str) -> Backend:
    try:
        module = BACKEND_MODULES[name]
    except KeyError:
        raise KeyError(f"unknown device {name!r}; known: {sorted(BACKEND_MODULES)}") from None
    return importlib.import_module(module).BACKEND
