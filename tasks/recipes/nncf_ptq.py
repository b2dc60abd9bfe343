"""Recipe `nncf_ptq`: NNCF post-training quantization of the OpenVINO model (FakeQuantize in the IR, int8)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tasks.core.errors import InputError
from tasks.core.onnx_graph import port_name
from tasks.recipes._openvino import ir_quant_counts, save_ir
from tasks.recipes.base import IR_ARTIFACT, IR_WEIGHTS, RecipeContext, RecipeSettings, row, rows


class NncfPtqSettings(RecipeSettings):
    """NNCF post-training quantization of the OpenVINO model (int8 activations and weights)."""

    method: Literal["nncf_ptq"] = "nncf_ptq"
    preset: Literal["mixed", "performance"] = Field("mixed", description="mixed: asymmetric activations")
    model_type: Literal["transformer"] | None = "transformer"
    subset_size: int = Field(300, ge=1, description="calibration rows used (capped at the rows in the npz)")
    fast_bias_correction: bool = True
    ignored_types: list[str] = Field([], description="OpenVINO op types to keep in float")
    ignored_patterns: list[str] = Field(
        [], description="regular expressions over op names (the ONNX node names) to keep in float, e.g. "
                        "'.*layer\\.\\d+/output/dense/MatMul' for a BERT's FFN output layers")

    @field_validator("ignored_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return patterns


def _nncf_ptq(model: Path, feeds, s: NncfPtqSettings, out: Path) -> int:
    import nncf
    import openvino as ov

    ov_model = ov.Core().read_model(str(model))
    names = [port_name(port) for port in ov_model.inputs]
    missing = sorted(set(names) - set(feeds))
    if missing:
        raise InputError(f"calibration npz lacks OpenVINO model input(s) {missing}")
    n_rows = rows(feeds)
    dataset = nncf.Dataset(range(n_rows), lambda i: {n: v for n, v in row(feeds, i).items() if n in names})
    ignored = (nncf.IgnoredScope(types=list(s.ignored_types), patterns=list(s.ignored_patterns))
               if s.ignored_types or s.ignored_patterns else None)
    try:
        quantized = nncf.quantize(
            ov_model,
            dataset,
            preset=nncf.QuantizationPreset(s.preset),
            model_type=nncf.ModelType.TRANSFORMER if s.model_type == "transformer" else None,
            subset_size=min(s.subset_size, n_rows),
            fast_bias_correction=s.fast_bias_correction,
            **({"ignored_scope": ignored} if ignored else {}),
        )
    except nncf.ValidationError as exc:  # e.g. an ignored type or pattern that the model does not contain
        raise InputError(f"quantize.variants (nncf_ptq): {str(exc).splitlines()[0][:300]}; "
                         "fix ignored_types / ignored_patterns") from exc
    save_ir(quantized, out)
    return min(s.subset_size, n_rows)


class NncfPtqRecipe:
    method = "nncf_ptq"
    settings = NncfPtqSettings
    artifact = IR_ARTIFACT
    companions = (IR_WEIGHTS,)
    dynamic_shapes = True
    tools = ("openvino", "nncf")

    def needs_calibration(self, settings: NncfPtqSettings) -> bool:
        return True

    def check(self, model: Path, settings: NncfPtqSettings) -> None:
        return None  # NNCF leaves the attention-mask add in float

    def apply(self, model: Path, feeds, settings: NncfPtqSettings, context: RecipeContext, out: Path, tmp: Path) -> dict:
        return {"calibration_rows": _nncf_ptq(model, feeds, settings, out)}

    def counts(self, artifact: Path) -> dict:
        return ir_quant_counts(artifact)


RECIPE = NncfPtqRecipe()
