"""Recipe `ort_dynamic`: ONNX Runtime's `quantize_dynamic`: int8 weights, activations quantized at run time (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.recipes._ort import onnx_quant_counts, preprocess, qtype
from tasks.recipes.base import ONNX_ARTIFACT, RecipeContext, RecipeSettings


class OrtDynamicSettings(RecipeSettings):
    """Dynamic quantization: int8 weights, activation ranges computed at run time (CPU only)."""

    method: Literal["ort_dynamic"] = "ort_dynamic"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: list[str] | None = Field(None, description="null = ORT's default (MatMul, Gather, ...)")
    nodes_to_exclude: list[str] = Field([], description="node names or patterns (`*/intermediate/dense/*`) of the "
                                        "pre-processed graph kept in float")


def _ort_dynamic(model: Path, s: OrtDynamicSettings, out: Path, tmp: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    pre, excluded = preprocess(model, tmp, s)
    # quantize_dynamic replaces each Gemm by MatMul `<gemm>_MatMul` + Add before it reads nodes_to_exclude.
    excluded += [f"{name}_MatMul" for name in excluded]
    quantize_dynamic(
        str(pre),
        str(out),
        op_types_to_quantize=s.op_types,
        per_channel=s.per_channel,
        reduce_range=s.reduce_range,
        weight_type=qtype(s.weight_type),
        nodes_to_exclude=excluded,
    )


class OrtDynamicRecipe:
    method = "ort_dynamic"
    settings = OrtDynamicSettings
    artifact = ONNX_ARTIFACT
    companions = ()
    dynamic_shapes = True
    tools = ("onnx", "onnxruntime")

    def needs_calibration(self, settings: OrtDynamicSettings) -> bool:
        return False

    def check(self, model: Path, settings: OrtDynamicSettings) -> None:
        return None  # no activation ranges are calibrated, so the mask fill does not matter

    def apply(self, model: Path, feeds, settings: OrtDynamicSettings, context: RecipeContext, out: Path, tmp: Path) -> dict:
        _ort_dynamic(model, settings, out, tmp)
        return {"calibration_rows": 0}

    def counts(self, artifact: Path) -> dict:
        return onnx_quant_counts(artifact)


RECIPE = OrtDynamicRecipe()
