"""The small interface every device backend implements."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class LoadedModel(Protocol):
    precision: str
    """The numeric precision the engine actually runs (e.g. fp32, or bf16 when an engine upcasts)."""

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One inference; returns the output embedding, shape [batch, hidden]."""


class Backend(Protocol):
    name: str
    engine_package: str
    """The Python distribution whose version is recorded with every benchmark row."""

    def unavailable_reason(self) -> str | None:
        """None when this machine can run the backend, else why not (recorded as a skip)."""

    def load(self, artifact: Path, threads: int) -> LoadedModel:
        """Create a ready-to-run session for `artifact` using exactly `threads` compute threads."""
