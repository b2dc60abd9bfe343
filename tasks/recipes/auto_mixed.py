"""Recipe `auto_mixed`: a base variant with the per-layer precision chosen for it under an accuracy budget.

The choice is made by the sensitivity stage of the base variant (tasks/stages/sensitivity.py): from every layer
group at the lower precision of its axis (the base's quantization on axis `float`; 8-bit activations in a uint16
`ort_qnn` base on axis `a8`), the groups that regain the most metric per multiply-accumulate go to the higher one
(float; 16-bit) until the metric is within `budget` of fp32, confirmed on the whole first evaluation set. It writes
`assignment-<this variant>.json` with the base's settings plus those groups' patterns (`nodes_to_exclude`;
`activations_8bit` for the rest); this recipe builds exactly that with the base's recipe (and
`override-<variant>.yaml` beside it is the same thing to paste into params.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, TypeAdapter, ValidationError

from tasks.core.errors import InputError
from tasks.recipes import recipe_for, variant_settings
from tasks.recipes._ort import onnx_quant_counts
from tasks.recipes.base import ONNX_ARTIFACT, RecipeContext, RecipeSettings

ASSIGNMENT = "assignment"
"""Role of the assignment file in `RecipeContext.imports`."""


class AutoMixedSettings(RecipeSettings):
    """The base variant with layer groups kept float until the metric is within `budget` of fp32."""

    method: Literal["auto_mixed"] = "auto_mixed"
    base: str = Field(description="a variant of an ONNX Runtime recipe, listed in sensitivity.variants")
    budget: float = Field(0.3, gt=0,
                          description="metric points below fp32 (on the first evaluation set) the assignment may lose")


def read_assignment(path: Path) -> tuple[dict, RecipeSettings]:
    """The assignment and the base settings it makes; InputError naming the file when it is not one."""
    try:
        assignment = json.loads(Path(path).read_text(encoding="utf-8"))
        settings = TypeAdapter(variant_settings()).validate_python(assignment["settings"])
    except FileNotFoundError:
        raise InputError(f"{path}: not found; run the sensitivity stage of the base variant first") from None
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise InputError(f"{path}: not an assignment the sensitivity stage wrote ({exc.__class__.__name__}); "
                         "rerun it") from None
    return assignment, settings


class AutoMixedRecipe:
    method = "auto_mixed"
    settings = AutoMixedSettings
    artifact = ONNX_ARTIFACT
    companions = ()
    dynamic_shapes = False  # built on a sensitivity stage's static-length probes
    tools = ("onnx", "onnxruntime")

    def needs_calibration(self, settings: AutoMixedSettings) -> bool:
        return True  # every base it takes (ort_static, ort_qnn) calibrates; ort_dynamic ignores the rows

    def check(self, model: Path, settings: AutoMixedSettings) -> None:
        return None  # the base's recipe checks the model when it builds

    def apply(self, model: Path, feeds, settings: AutoMixedSettings, context: RecipeContext, out: Path, tmp: Path) -> dict:
        if ASSIGNMENT not in context.imports:
            raise InputError(f"quantize.variants (auto_mixed, base {settings.base}): no assignment handed to the "
                             "recipe; run it through the pipeline, after the base's sensitivity stage")
        assignment, chosen = read_assignment(context.imports[ASSIGNMENT])
        base = recipe_for(chosen)
        base.check(model, chosen)
        limit = getattr(chosen, "calibration_rows", None)
        if feeds is not None and limit:  # what the quantize stage does for the base variant itself
            feeds = {name: rows[:limit] for name, rows in feeds.items()}
        facts = base.apply(model, feeds, chosen, context, out, tmp)
        return {**facts, "base": settings.base, "higher_groups": assignment["higher_groups"],
                "assignment_loss": assignment["loss"], "assignment_within_budget": assignment["within_budget"]}

    def counts(self, artifact: Path) -> dict:
        return onnx_quant_counts(artifact)


RECIPE = AutoMixedRecipe()
