"""Recipe `nncf_weights`: NNCF weight-only compression (int8 / int4 weights, float activations)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.core.errors import InputError
from tasks.recipes._openvino import ir_quant_counts, save_ir
from tasks.recipes.base import IR_ARTIFACT, IR_WEIGHTS, RecipeContext, RecipeSettings


class NncfWeightsSettings(RecipeSettings):
    """NNCF weight-only compression: weights stored as int8/int4, activations stay float."""

    method: Literal["nncf_weights"] = "nncf_weights"
    mode: Literal["int8_asym", "int8_sym", "int4_asym", "int4_sym"] = "int8_asym"
    group_size: int | None = Field(None, ge=-1, description="int4 only: weights per scale (-1 = per channel)")
    ratio: float | None = Field(None, gt=0, le=1, description="int4 only: share of layers in int4, rest int8")
    all_layers: bool | None = Field(None, description="int4 only: also int4 for embeddings and the last layer")


def _nncf_weights(model: Path, s: NncfWeightsSettings, out: Path) -> None:
    import nncf
    import openvino as ov

    ov_model = ov.Core().read_model(str(model))
    kwargs = {"mode": nncf.CompressWeightsMode(s.mode)}
    if s.mode.startswith("int4"):
        kwargs.update(
            {k: v for k, v in (("group_size", s.group_size), ("ratio", s.ratio), ("all_layers", s.all_layers)) if v is not None}
        )
    elif s.group_size is not None or s.ratio is not None or s.all_layers is not None:
        raise InputError(f"quantize.variants: group_size/ratio/all_layers apply to int4 modes only, not {s.mode}")
    compressed = nncf.compress_weights(ov_model, **kwargs)
    save_ir(compressed, out)


class NncfWeightsRecipe:
    method = "nncf_weights"
    settings = NncfWeightsSettings
    artifact = IR_ARTIFACT
    companions = (IR_WEIGHTS,)
    dynamic_shapes = True
    tools = ("openvino", "nncf")

    def needs_calibration(self, settings: NncfWeightsSettings) -> bool:
        return False

    def check(self, model: Path, settings: NncfWeightsSettings) -> None:
        return None

    def apply(self, model: Path, feeds, settings: NncfWeightsSettings, context: RecipeContext, out: Path, tmp: Path) -> dict:
        _nncf_weights(model, settings, out)
        return {"calibration_rows": 0}

    def counts(self, artifact: Path) -> dict:
        return ir_quant_counts(artifact)


RECIPE = NncfWeightsRecipe()
