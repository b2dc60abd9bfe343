"""The small interface every device backend implements, and the compile options every device shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from tasks.core.params import StrictParams


class DeviceCompileParams(StrictParams):
    """What every device's `compile.<device>` section shares; each device adds its options."""

    max_cpu_fallback_nodes: int = Field(
        0, ge=0, description="fail the stage when more source nodes than this run on the CPU EP"
    )

    def check_target(self, target: str) -> None:
        """ConfigError when `target` is not one this device compiles for (a label by default)."""

    def backend_options(self, target: str | None, threads: int) -> dict[str, Any]:
        raise NotImplementedError


class LoadedModel(Protocol):
    precision: str
    """The numeric precision the engine actually runs (e.g. fp32, or bf16 when an engine upcasts)."""

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One inference; returns the model's output, shape [batch, ...]."""


class Backend(Protocol):
    name: str
    engine_package: str
    """The Python distribution whose version is recorded with every benchmark row."""
    compile_params: type[DeviceCompileParams] | None
    """The options of its `compile.<device>` section; None when the device has no compile step."""
    dynamic_shapes: bool
    """Whether it runs models with a free shape axis (`shape: dynamic` variants); NPUs take static shapes only."""
    pins_shapes: bool
    """Whether `load(..., pin_shape=L)` compiles a free-axis model at one static length L (`bundle.pinned`): for
    engines where a static graph runs faster than a free-axis one whose shape changes between inputs."""

    def unavailable_reason(self) -> str | None:
        """None when this machine can run the backend, else why not (recorded as a skip)."""

    def load(self, artifact: Path, threads: int) -> LoadedModel:
        """Create a ready-to-run session for `artifact` using exactly `threads` compute threads."""

    def accelerator_nodes(self, placement: dict) -> int:
        """Source nodes a compiled artifact places on an accelerator (0 for CPU devices)."""
