"""The base of every params section: unknown keys are errors, values are frozen (hashable into cache keys)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class StrictParams(BaseModel):
    # No params value is infinite or NaN: a `.inf` budget or `.nan` threshold would pass every comparison silently.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def path_fields(value: Any, where: str = "") -> Iterator[tuple[str, Path]]:
    """Every Path in a params model, by its dotted field name (`calibration_data.sources[0].path`), found by
    walking the model, so a new path field is checked without anyone listing it."""
    if isinstance(value, Path):
        yield where, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from path_fields(getattr(value, name), f"{where}.{name}" if where else name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from path_fields(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from path_fields(item, f"{where}.{key}")
