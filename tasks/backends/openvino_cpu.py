"""OpenVINO on the CPU plugin.

Compiled for latency with exactly the benchmark's thread count. INFERENCE_PRECISION_HINT defaults
to f32: on CPUs with AMX/avx512_bf16 the plugin would otherwise run float models in bf16, which is
a different variant from the one being measured. `precision` reports what the compiled model uses.
`compile` exports a `model.blob` for this machine's CPU (its ISA is baked in); `load` imports it.
"""

from __future__ import annotations

from pydantic import Field

from tasks.backends._openvino import OpenVinoBackend, OpenVinoCompileParams, OpenVinoModel


class OpenVinoCpuCompileParams(OpenVinoCompileParams):
    inference_precision: str | None = Field(
        "f32", description="INFERENCE_PRECISION_HINT; f32 (else AMX/avx512_bf16 CPUs run fp32 layers as bf16)"
    )


class OpenVinoCpuBackend(OpenVinoBackend):
    compile_params = OpenVinoCpuCompileParams

    def __init__(self, inference_precision: str | None = "f32", cache_dir=None):
        super().__init__("openvino_cpu", "CPU", inference_precision=inference_precision, cache_dir=cache_dir)

    def accelerator_nodes(self, placement: dict) -> int:
        return 0


BACKEND = OpenVinoCpuBackend()

__all__ = ["BACKEND", "OpenVinoCpuBackend", "OpenVinoModel"]
