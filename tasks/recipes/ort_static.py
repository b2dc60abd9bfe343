"""Recipe `ort_static`: static QDQ quantization with ONNX Runtime's `quantize_static` (activations and weights).

Optional fixes for full-graph 8-bit transformers: a floor under the Softmax inputs (the attention-mask fill
otherwise stretches their range), a wider type for the residual stream and LayerNorm outlier smoothing
(both from the family's QuantizationHints), and linear layers as Gemm so ONNX Runtime CPU runs each as one
QGemm (e.g. ort_qdq_a8w8 for the CPU, ort_qdq_a8w8_allops for a full-graph NPU partition).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.core.errors import InputError
from tasks.recipes._ort import NpzReader, chunk, is16, onnx_quant_counts, preprocess, qtype, tensor_overrides
from tasks.recipes.base import (
    ONNX_ARTIFACT,
    LayerNormSmoothing,
    RecipeContext,
    RecipeSettings,
    refuse_huge_mask_fill,
    rows,
    smoothed,
    transformer_hints,
)
from tasks.transforms.quant_rewrites import activation_matmuls, linear_layers_as_gemm, softmax_floor_ranges

CalibrateMethod = Literal["MinMax", "Entropy", "Percentile"]


class OrtStaticSettings(LayerNormSmoothing, RecipeSettings):
    """Static QDQ quantization with ONNX Runtime (activations and weights both quantized)."""

    method: Literal["ort_static"] = "ort_static"
    activation_type: Literal["uint8", "int8", "uint16", "int16"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = Field(True, description="one scale per output channel of each weight")
    reduce_range: bool = Field(False, description="7-bit weights (avoids u8s8 overflow on CPUs without VNNI)")
    activation_symmetric: bool = False
    calibrate_method: CalibrateMethod = "MinMax"
    percentile: float = Field(99.999, gt=90, le=100, description="for calibrate_method: Percentile")
    calibration_rows: int | None = Field(None, ge=1, description="first N rows of the npz; null = all")
    op_types: list[str] | None = Field(None, description="op types to quantize; null = every supported op")
    nodes_to_exclude: list[str] = Field([], description="node names or patterns (`*/intermediate/dense/*`) of the "
                                        "pre-processed graph kept in float")
    softmax_input_floor: float | None = Field(
        None,
        lt=0,
        description="clip the calibrated minimum of every Softmax input (attention scores + mask) to this "
        "value, so the mask fill (-1e4) does not stretch the 8-bit scale; weight lost < e^floor",
    )
    residual_type: Literal["uint8", "int8", "uint16", "int16"] | None = Field(
        None,
        description="type for each LayerNormalization input (residual sum) and the sub-layer output added "
        "into it, where BERT's outlier channels live; null = activation_type",
    )
    gemm_linear_layers: bool = Field(
        False,
        description="rewrite each MatMul(x, W) + Add(bias) as Reshape -> Gemm -> Reshape before quantizing, so "
        "ONNX Runtime CPU runs the layer as one QGemm (int8 GEMM, bias folded in); left as MatMul + Add, ORT's "
        "MatMul+Add->Gemm fusion runs before its QDQ fusions, puts a Reshape between the activation's "
        "DequantizeLinear and the layer, and the layer runs in float on weights dequantized every run",
    )
    float_output_op_types: list[str] = Field(
        [],
        description="op types whose outputs get no Q/DQ pair (ORT's OpTypesToExcludeOutputQuantization); "
        "[MatMul, Gemm] lets ORT CPU fuse each into an integer GEMM with a float output instead of "
        "requantizing its result to 8 bits and dequantizing it for the next float op",
    )
    activation_matmuls: bool = Field(
        True,
        description="quantize MatMuls whose inputs are both activations (attention Q.K^T and P.V); false keeps "
        "them float (ORT CPU has no faster integer kernel for these small per-head products)",
    )
    tensor_overrides: dict[str, dict[str, str | float | int | bool]] = Field(
        {}, description="ORT TensorQuantOverrides per tensor name or pattern (`*/intermediate_act_fn/Mul_1_output_0`): "
        "quant_type (e.g. uint16), rmin+rmax, symmetric"
    )


def _structural_overrides(graph, s: OrtStaticSettings, ranges, context: RecipeContext) -> dict[str, list[dict]]:
    """TensorQuantOverrides from the settings: explicit ones, residual stream type, Softmax floor."""
    overrides = tensor_overrides(s.tensor_overrides, graph)
    if s.residual_type and s.residual_type != s.activation_type:
        for name in transformer_hints(context, s.method, "residual_type").residual_tensors(graph):
            overrides.setdefault(name, [{}])[0].setdefault("quant_type", qtype(s.residual_type))
    if s.softmax_input_floor is not None:
        for name, (low, high) in softmax_floor_ranges(graph, ranges, s.softmax_input_floor).items():
            entry = overrides.setdefault(name, [{}])[0]
            entry.setdefault("rmin", low)  # an explicit tensor_overrides range wins
            entry.setdefault("rmax", high)
    return overrides


def _ort_static(model: Path, feeds, s: OrtStaticSettings, context: RecipeContext, out: Path, tmp: Path) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    if s.gemm_linear_layers:
        gemm = tmp / "gemm.onnx"
        if linear_layers_as_gemm(model, gemm):
            model = gemm
    pre, excluded_by_name = preprocess(model, tmp, s)
    pre = smoothed(pre, feeds, s, context, tmp)
    graph = onnx.load(str(pre), load_external_data=False).graph
    absent = sorted(set(s.float_output_op_types) - {n.op_type for n in graph.node})
    if absent:
        raise InputError(f"quantize.variants (ort_static): float_output_op_types {absent} not in {model}; fix the names")
    excluded = excluded_by_name + ([] if s.activation_matmuls else activation_matmuls(graph))
    cache = tmp / "calibration.json"
    common = dict(
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=s.op_types,
        per_channel=s.per_channel,
        reduce_range=s.reduce_range,
        activation_type=qtype(s.activation_type),
        weight_type=qtype(s.weight_type),
        nodes_to_exclude=excluded,
        calibrate_method=getattr(CalibrationMethod, s.calibrate_method),
        calibration_cache_path=str(cache),
    )
    extra = {
        "ActivationSymmetric": s.activation_symmetric,
        "CalibStridedMinMax": chunk(rows(feeds), context.calibration_chunk),
        "CalibPercentile": s.percentile,
        "OpTypesToExcludeOutputQuantization": list(s.float_output_op_types),
    }
    ranges = {}
    if s.softmax_input_floor is not None:
        # Calibrate once (the throwaway model fills the cache), then quantize with ranges that need
        # the calibrated maximum; the second call reads the cache instead of recalibrating.
        quantize_static(str(pre), str(tmp / "calibrated.onnx"), NpzReader(feeds), extra_options=extra, **common)
        ranges = load_tensors_data(cache).data
    overrides = _structural_overrides(graph, s, ranges, context)
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    if any(is16(t) for t in [s.activation_type, *(e[0].get("quant_type") for e in overrides.values())]):
        extra["UseQDQContribOps"] = True  # 16-bit Q/DQ on opset < 21 needs the com.microsoft ops
    quantize_static(str(pre), str(out), NpzReader(feeds), extra_options=extra, **common)


class OrtStaticRecipe:
    method = "ort_static"
    settings = OrtStaticSettings
    artifact = ONNX_ARTIFACT
    companions = ()
    dynamic_shapes = True
    tools = ("onnx", "onnxruntime")

    def needs_calibration(self, settings: OrtStaticSettings) -> bool:
        return True

    def check(self, model: Path, settings: OrtStaticSettings) -> None:
        if settings.calibrate_method == "MinMax" and settings.softmax_input_floor is not None:
            return  # the floor clips the fill value out of the attention-score range
        refuse_huge_mask_fill(model)

    def apply(self, model: Path, feeds, settings: OrtStaticSettings, context: RecipeContext, out: Path, tmp: Path) -> dict:
        _ort_static(model, feeds, settings, context, out, tmp)
        return {"calibration_rows": rows(feeds)}

    def counts(self, artifact: Path) -> dict:
        return onnx_quant_counts(artifact)


RECIPE = OrtStaticRecipe()
