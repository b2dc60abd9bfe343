"""OpenVINO on the NPU plugin (Intel Core Ultra). Never AUTO: no NPU means unavailable, not CPU.

The NPU compiles static shapes only and runs float models in f16 by default (reported in
`precision`); `threads` does not apply to the NPU itself and is ignored.
"""

from __future__ import annotations

from tasks.backends._openvino import OpenVinoBackend, OpenVinoModel


class OpenVinoNpuBackend(OpenVinoBackend):
    def __init__(self, inference_precision: str | None = None, cache_dir=None):
        super().__init__("openvino_npu", "NPU", inference_precision=inference_precision, cache_dir=cache_dir)


BACKEND = OpenVinoNpuBackend()

__all__ = ["BACKEND", "OpenVinoModel", "OpenVinoNpuBackend"]
