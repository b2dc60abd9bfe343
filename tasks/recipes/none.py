"""Recipe `none`: the unquantized export (fp32), linked into place so every variant has the same path pattern."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from tasks.recipes.base import ONNX_ARTIFACT, RecipeContext, RecipeSettings


class NoQuantization(RecipeSettings):
    """The unquantized export (fp32), linked into place so every variant has the same path pattern."""

    method: Literal["none"] = "none"


class NoneRecipe:
    method = "none"
    settings = NoQuantization
    artifact = ONNX_ARTIFACT
    companions = ()
    dynamic_shapes = True
    tools: tuple[str, ...] = ()

    def needs_calibration(self, settings: NoQuantization) -> bool:
        return False

    def check(self, model: Path, settings: NoQuantization) -> None:
        return None

    def apply(self, model: Path, feeds, settings: NoQuantization, context: RecipeContext, out: Path, tmp: Path) -> dict:
        """A hard link costs no space (DVC's cache dedups by content anyway); copy across filesystems."""
        try:
            os.link(model, out)
        except OSError:
            shutil.copy2(model, out)
        return {}

    def counts(self, artifact: Path) -> dict:
        return {}


RECIPE = NoneRecipe()
