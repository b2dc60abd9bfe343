"""OpenVINO on the CPU plugin.

Compiled for latency with exactly the benchmark's thread count. INFERENCE_PRECISION_HINT defaults
to f32: on CPUs with AMX/avx512_bf16 the plugin would otherwise run float models in bf16, which is
a different variant from the one being measured. `precision` reports what the compiled model uses.
`compile` exports a `model.blob` for this machine's CPU (its ISA is baked in); `load` imports it.

Precision is a variant too, not only a global switch: a compile job's target `host` uses
`inference_precision`, and `host_<precision>` (e.g. `host_bf16`) compiles with that hint instead, so
the f32 and bf16 executions of one IR are benchmarked (and judged for accuracy) side by side.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tasks.backends._openvino import OpenVinoBackend, OpenVinoCompileParams, OpenVinoModel
from tasks.core.errors import ConfigError


HOST = "host"
PRECISIONS = ("f32", "bf16", "f16")


class OpenVinoCpuCompileParams(OpenVinoCompileParams):
    inference_precision: str | None = Field(
        "f32", description="INFERENCE_PRECISION_HINT of target host; f32 (else AMX/avx512_bf16 CPUs run fp32 layers "
        "as bf16). Targets host_f32 / host_bf16 / host_f16 set their own"
    )

    def check_target(self, target: str) -> None:
        if target != HOST and target.removeprefix(f"{HOST}_") not in PRECISIONS:
            raise ConfigError(f"compile.openvino_cpu: unknown target {target!r}; use {HOST} (inference_precision) or "
                              f"{', '.join(f'{HOST}_{p}' for p in PRECISIONS)}")

    def backend_options(self, target: str | None, threads: int) -> dict[str, Any]:
        options = super().backend_options(target, threads)
        if target and target != HOST:
            self.check_target(target)
            options["inference_precision"] = target.removeprefix(f"{HOST}_")
        return options


class OpenVinoCpuBackend(OpenVinoBackend):
    compile_params = OpenVinoCpuCompileParams
    dynamic_shapes = True
    # A free-axis graph re-prepares its kernels whenever the input length changes, so on a mix of lengths the same
    # IR compiled at a few static lengths runs faster (bundle rows pinned vs dynamic: docs/bundles.md).
    pins_shapes = True

    def __init__(self, inference_precision: str | None = "f32", cache_dir=None):
        super().__init__("openvino_cpu", "CPU", inference_precision=inference_precision, cache_dir=cache_dir)

    def accelerator_nodes(self, placement: dict) -> int:
        return 0


BACKEND = OpenVinoCpuBackend()

__all__ = ["BACKEND", "OpenVinoCpuBackend", "OpenVinoModel"]
