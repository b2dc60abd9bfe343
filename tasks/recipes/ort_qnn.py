"""Recipe `ort_qnn`: ONNX Runtime's QDQ recipe for the QNN execution provider (`get_qnn_qdq_config`), 16-bit
activations by default, with the changes measured on MiniLM against the HTP simulator (per-channel int8
MatMul weights, a floor under the Softmax inputs, attention's activation x activation MatMuls in float).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.recipes._ort import (
    NpzReader,
    chunk,
    lowered_node_overrides,
    node_names,
    onnx_quant_counts,
    preprocess,
    qtype,
)
from tasks.recipes.base import (
    ONNX_ARTIFACT,
    LayerNormSmoothing,
    RecipeContext,
    RecipeSettings,
    refuse_huge_mask_fill,
    rows,
    smoothed,
)
from tasks.transforms.quant_rewrites import activation_matmuls, softmax_floor_ranges, unit_norm_outputs, unshare_biases
from tasks.transforms.surgery import qnn_preprocess

CalibrateMethod = Literal["MinMax", "Entropy", "Percentile"]


class OrtQnnSettings(LayerNormSmoothing, RecipeSettings):
    """ONNX Runtime's QDQ recipe for the QNN execution provider (16-bit activations by default), with
    three changes measured on MiniLM against the HTP simulator (docs/quantization.md, "ort_qdq_a16w8"): per-channel int8
    MatMul weights, a floor under the Softmax inputs, and attention's activation x activation MatMuls
    left in float (fp16 on the HTP). Each is a setting; all off is ORT's stock recipe."""

    method: Literal["ort_qnn"] = "ort_qnn"
    activation_type: Literal["uint16", "uint8"] = "uint16"
    weight_type: Literal["uint8", "int8"] = Field(
        "uint8", description="per-tensor weights (LayerNorm, embeddings; MatMul/Gemm unless matmul_per_channel)"
    )
    weight_symmetric: bool | None = Field(
        None, description="null = the recipe's rule (symmetric for signed weight types)"
    )
    matmul_per_channel: bool = Field(
        True,
        description="MatMul/Gemm weights int8, symmetric, one scale per output channel. The stock per-tensor "
        "uint8 weights are asymmetric, and the HTP takes 8-bit weights as int8 around their zero point: "
        "entries beyond it are clipped (one output column per projection off by up to 134 steps)",
    )
    per_channel: bool = Field(False, description="ORT's flag: per-channel Conv weights")
    activation_symmetric: bool = False
    calibrate_method: CalibrateMethod = "MinMax"
    calibration_rows: int | None = Field(None, ge=1, description="first N rows of the npz; null = all")
    softmax_input_floor: float | None = Field(
        -20.0,
        lt=0,
        description="clip the calibrated minimum of every Softmax input (scores + mask) to this value: the "
        "-1e4 mask fill otherwise makes the 16-bit step 0.15 logits, where one rounding flip moves a "
        "probability by 16%; weight lost < e^floor; null = off",
    )
    float_activation_matmuls: bool = Field(
        True,
        description="keep MatMuls of two activations (attention Q.K^T, P.V) and the constant scaling of their "
        "output in float: the HTP runs them in fp16 (compile.qnn_htp.enable_htp_fp16_precision). Quantized, "
        "the HTP computes them below the 16-bit precision the CPU EP runs the QDQ graph at",
    )
    op_types: list[str] | None = Field(None, description="null = every op type except Cast (the recipe's default)")
    nodes_to_exclude: list[str] = Field([], description="node names or patterns (`*/intermediate/dense/*`) of the "
                                        "pre-processed graph kept in float")
    unit_norm_output_range: bool = Field(
        True,
        description="quantize every L2 LpNormalization output over [-1, 1], its exact bound, not the calibrated "
        "range: the HTP's 16-bit L2Norm maps a value below its output range to the range's maximum (QNN SDK 2.51, "
        "simulator) where the CPU EP clips it to the minimum, flipping one component of the embedding",
    )
    activations_8bit: list[str] = Field(
        [],
        description="node names or patterns (`*/intermediate/dense/*`) of the pre-processed graph that run at uint8 "
        "activations while the rest keep activation_type (uint16): per-layer mixed precision. Conversions (ORT "
        "TensorQuantOverrides `convert`) sit on the edges into and out of the named nodes only; ORT's own fixer "
        "would lower whole tensors, with their producers and other readers",
    )
    qnn_preprocess: bool = Field(
        True,
        description="run ORT's qnn_preprocess_model first (fuses the Erf GELU into Gelu, which the HTP runs; "
        "a bare Erf falls back to the CPU)",
    )


    @model_validator(mode="after")
    def _mixed_needs_16_bit(self) -> OrtQnnSettings:
        if self.activations_8bit and self.activation_type != "uint16":
            raise ValueError("activations_8bit lowers layers of a uint16 graph to uint8; set activation_type: uint16")
        return self


def _ort_qnn(model: Path, feeds, s: OrtQnnSettings, context: RecipeContext, out: Path, tmp: Path) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if s.qnn_preprocess:
        fused, _ = qnn_preprocess(onnx.load(str(model)), tmp)
        model = tmp / "qnn_preprocessed.onnx"
        onnx.save(fused, str(model))
    pre, excluded_by_name = preprocess(model, tmp, s)
    pre = smoothed(pre, feeds, s, context, tmp)  # before the 8-bit layers' ranges are calibrated
    proto = onnx.load(str(pre))
    if unshare_biases(proto.graph):
        onnx.save(proto, str(pre))
    graph = proto.graph
    weights = {i.name for i in graph.initializer}
    overrides = {}
    if s.matmul_per_channel:
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
                transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
                axis = 0 if transposed else 1  # the output channels
                overrides[node.input[1]] = [{"quant_type": qtype("int8"), "symmetric": True, "axis": axis}]
    excluded = excluded_by_name + (activation_matmuls(graph) if s.float_activation_matmuls else [])
    config = get_qnn_qdq_config(
        str(pre),
        NpzReader(feeds),
        calibrate_method=getattr(CalibrationMethod, s.calibrate_method),
        activation_type=qtype(s.activation_type),
        weight_type=qtype(s.weight_type),
        per_channel=s.per_channel,
        init_overrides=overrides or None,
        activation_symmetric=s.activation_symmetric,
        weight_symmetric=s.weight_symmetric,
        stride=chunk(rows(feeds), context.calibration_chunk),
        op_types_to_quantize=s.op_types,
        nodes_to_exclude=excluded or None,
    )
    tensor_overrides = config.extra_options["TensorQuantOverrides"]
    lowered = set(node_names(graph, list(s.activations_8bit), "activations_8bit", "quantize.variants (ort_qnn)"))
    if lowered:  # per-layer 8-bit activations, converted on the edges into and out of the named nodes
        for name, entry in lowered_node_overrides(proto, lowered, qtype("uint8"), qtype(s.activation_type)).items():
            tensor_overrides.setdefault(name, [{}])[0].update(entry)
    if s.unit_norm_output_range:
        for name in unit_norm_outputs(graph):
            tensor_overrides.setdefault(name, [{}])[0].update(rmin=np.float32(-1.0), rmax=np.float32(1.0))
    # The recipe's `quantize(config)` cannot reuse a calibration; quantize_static with its settings can.
    cache = tmp / "qnn_calibration.json"
    common = dict(
        quant_format=config.quant_format,
        op_types_to_quantize=config.op_types_to_quantize,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=config.activation_type,
        weight_type=config.weight_type,
        nodes_to_quantize=config.nodes_to_quantize,
        nodes_to_exclude=config.nodes_to_exclude,
        calibrate_method=config.calibrate_method,
        calibration_providers=config.calibration_providers,
        extra_options=config.extra_options,
        calibration_cache_path=str(cache),
    )
    if s.softmax_input_floor is not None:
        # Calibrate once (the throwaway model fills the cache), then set each Softmax input's range from
        # the floor and its calibrated maximum; the second call reads the cache instead of recalibrating.
        quantize_static(str(pre), str(tmp / "qnn_calibrated.onnx"), NpzReader(feeds), **common)
        ranges = load_tensors_data(cache).data
        tensor_overrides = config.extra_options["TensorQuantOverrides"]
        for name, (low, high) in softmax_floor_ranges(graph, ranges, s.softmax_input_floor).items():
            tensor_overrides.setdefault(name, [{}])[0].update(rmin=low, rmax=high)
    quantize_static(str(pre), str(out), NpzReader(feeds), **common)


class OrtQnnRecipe:
    method = "ort_qnn"
    settings = OrtQnnSettings
    artifact = ONNX_ARTIFACT
    companions = ()
    dynamic_shapes = False  # for the QNN HTP, which takes static shapes only
    tools = ("onnx", "onnxruntime")

    def needs_calibration(self, settings: OrtQnnSettings) -> bool:
        return True

    def check(self, model: Path, settings: OrtQnnSettings) -> None:
        refuse_huge_mask_fill(model)

    def apply(self, model: Path, feeds, settings: OrtQnnSettings, context: RecipeContext, out: Path, tmp: Path) -> dict:
        _ort_qnn(model, feeds, settings, context, out, tmp)
        return {"calibration_rows": rows(feeds)}

    def counts(self, artifact: Path) -> dict:
        return onnx_quant_counts(artifact)


RECIPE = OrtQnnRecipe()
