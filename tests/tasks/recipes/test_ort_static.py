"""Recipe ort_static on a tiny random BERT: static QDQ artifacts that still run, and the fixes its variants use."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from helpers import matches_reference, ort_embed, quantize_variant

from tasks.config import load_config
from tasks.core.errors import InputError
from tasks.recipes.ort_static import OrtStaticSettings

SEQ = 16
REPO = Path(__file__).resolve().parents[3]
VARIANTS = load_config(REPO / "params.yaml").quantize.variants  # the project's variants

def test_ort_static_a8w8(tmp_path, tiny_fixed, calib, eval_feeds):
    out, payload = quantize_variant(tmp_path, tiny_fixed, calib, "a8w8", OrtStaticSettings(calibration_rows=8))
    stamp = json.loads((out / "stage.json").read_text())
    assert stamp["key"] == "k-a8w8" and stamp["files"] == ["model.onnx"]
    assert payload["artifact"] == "model.onnx" and payload["calibration_rows"] == 8
    assert payload["quantize_linear_nodes"] > 20 and payload["dequantize_linear_nodes"] > payload["quantize_linear_nodes"]
    assert payload["tool_versions"]["onnxruntime"] == ort.__version__
    graph = onnx.load(out / "model.onnx").graph
    inits = {i.name: i for i in graph.initializer}
    # per-channel int8 weights: some DequantizeLinear reads an int8 weight with a vector of scales
    weight_dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                  and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert weight_dqs and any(len(inits[n.input[1]].dims) == 1 for n in weight_dqs)
    assert matches_reference(ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_fixed, eval_feeds), 0.97)


def _qparams(graph, tensor):
    """(scale, zero-point dtype) of the QuantizeLinear that quantizes `tensor` (or its DQ output)."""
    tensor = tensor.removesuffix("_DequantizeLinear_Output")
    inits = {i.name: i for i in graph.initializer}
    node = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(onnx.numpy_helper.to_array(inits[node.input[1]])), inits[node.input[2]].data_type


def test_ort_static_recipe_floor_and_16_bit_residuals(tmp_path, tiny_onnx, tiny_fixed, calib, eval_feeds):
    settings = VARIANTS["ort_qdq_a8w8_allops"]
    assert settings.softmax_input_floor is not None and settings.residual_type == "uint16"
    assert settings.smooth_layernorm_alpha is not None
    # The floor clips the mask fill out of the score range, so even the unfixed export quantizes well.
    for model in (tiny_fixed, tiny_onnx):
        out, payload = quantize_variant(tmp_path, model, calib, f"recipe-{model.stem}", settings)
        q = onnx.load(out / "model.onnx").graph
        softmax_in = [n.input[0] for n in q.node if n.op_type == "Softmax"]
        for name in softmax_in:  # scale covers [floor, max score] in 8 bits, not [-1e4, max]
            scale, zp_type = _qparams(q, name)
            assert zp_type == onnx.TensorProto.UINT8 and scale < 40 / 255
        residual = [n.input[0] for n in q.node if n.op_type == "LayerNormalization"]
        assert {_qparams(q, name)[1] for name in residual} == {onnx.TensorProto.UINT16}
        unsmooth = [n for n in q.node if n.name.endswith("/unsmooth")]  # smoothing ran; skip path restored
        assert len(unsmooth) >= 3 and {_qparams(q, n.output[0])[1] for n in unsmooth} == {onnx.TensorProto.UINT16}
        matmul_in = [n.input[0] for n in q.node if n.op_type == "MatMul"]
        assert onnx.TensorProto.UINT8 in {_qparams(q, name)[1] for name in matmul_in if _has_q(q, name)}
        assert matches_reference(ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_onnx, eval_feeds), 0.98)


def _ort_cpu_ops(path, tmp_path):
    """Op types of `path` as ONNX Runtime's CPU EP runs it (all graph optimizations, as the benchmark),
    and the float MatMul/Gemm nodes that read a DequantizeLinear output (layers run on dequantized values)."""
    from collections import Counter

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{path.parent.name}-ort.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    float_on_dq = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "FusedMatMul") and set(n.input) & dq_outputs]
    return Counter(n.op_type for n in graph.node), float_on_dq


def test_ort_static_cpu_recipe_runs_integer_gemms(tmp_path, tiny_fixed, calib, eval_feeds):
    """The project's a8w8 recipe: every linear layer becomes one ORT CPU QGemm, attention stays float."""
    settings = VARIANTS["ort_qdq_a8w8"]
    assert settings.gemm_linear_layers and not settings.activation_matmuls
    out, payload = quantize_variant(tmp_path, tiny_fixed, calib, "cpu", settings)
    q = onnx.load(out / "model.onnx").graph
    inits = {i.name: i for i in q.initializer}
    producers = {o: n for n in q.node for o in n.output}
    gemms = [n for n in q.node if n.op_type == "Gemm"]
    assert len(gemms) == 12
    for gemm in gemms:  # uint8 activation, int8 weight, int32 bias, each behind a DequantizeLinear
        dqs = [producers[i] for i in gemm.input]
        assert [d.op_type for d in dqs] == ["DequantizeLinear"] * 3
        assert inits[dqs[0].input[2]].data_type == onnx.TensorProto.UINT8
        assert [inits[d.input[0]].data_type for d in dqs[1:]] == [onnx.TensorProto.INT8, onnx.TensorProto.INT32]
        assert not _has_q(q, gemm.output[0])  # float output: no requantization
    attention = [n for n in q.node if n.op_type == "MatMul"]
    assert len(attention) == 4 and not any(i in producers and producers[i].op_type == "DequantizeLinear"
                                           for n in attention for i in n.input)

    ops, float_on_dq = _ort_cpu_ops(out / "model.onnx", tmp_path)
    assert ops["QGemm"] == 12 and not float_on_dq and ops["DequantizeLinear"] == 0
    assert matches_reference(ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_fixed, eval_feeds), 0.98)


def test_float_output_op_types_must_occur(tmp_path, tiny_fixed, calib):
    settings = OrtStaticSettings(float_output_op_types=["Matmul"])
    with pytest.raises(InputError, match="float_output_op_types"):
        quantize_variant(tmp_path, tiny_fixed, calib, "typo", settings)


def _has_q(graph, tensor):
    tensor = tensor.removesuffix("_DequantizeLinear_Output")
    return any(n.op_type == "QuantizeLinear" and n.input[0] == tensor for n in graph.node)


def test_ort_static_entropy_with_tensor_override(tmp_path, tiny_fixed, calib, eval_feeds):
    graph = onnx.load(tiny_fixed).graph
    softmax_in = next(n.input[0] for n in graph.node if n.op_type == "Softmax")
    settings = OrtStaticSettings(calibrate_method="Entropy", tensor_overrides={softmax_in: {"quant_type": "uint16"}})
    out, payload = quantize_variant(tmp_path, tiny_fixed, calib, "ent", settings, calibration_chunk=5)
    q = onnx.load(out / "model.onnx").graph
    inits = {i.name: i for i in q.initializer}
    zp_types = {inits[n.input[2]].data_type for n in q.node if n.op_type == "QuantizeLinear" and n.input[0] == softmax_in}
    assert zp_types == {onnx.TensorProto.UINT16}
    assert matches_reference(ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_fixed, eval_feeds), 0.95)


def test_tensor_override_pattern_reaches_every_matching_tensor(tmp_path, tiny_fixed, calib):
    """One pattern puts every FFN activation (GELU output) at 16 bit: what a per-model params file writes once."""
    pattern = "*/intermediate_act_fn/Mul_1_output_0"
    settings = OrtStaticSettings(tensor_overrides={pattern: {"quant_type": "uint16"}})
    out, _ = quantize_variant(tmp_path, tiny_fixed, calib, "pattern", settings)
    q = onnx.load(out / "model.onnx").graph
    inits = {i.name: i for i in q.initializer}
    zero_points = {n.input[0]: inits[n.input[2]].data_type for n in q.node if n.op_type == "QuantizeLinear"}
    ffn = {t: dtype for t, dtype in zero_points.items() if fnmatch.fnmatch(t, pattern)}
    assert len(ffn) == 2 and set(ffn.values()) == {onnx.TensorProto.UINT16}
    # The Reshapes in front of the fused FFN-output Gemms pass the 16-bit scale on; every other tensor stays 8-bit.
    passed_on = {n.output[0] for n in q.node if n.op_type == "Reshape" and n.input[0].removesuffix(
        "_DequantizeLinear_Output") in ffn}
    wide = {t for t, dtype in zero_points.items() if t not in ffn and dtype != onnx.TensorProto.UINT8}
    assert len(passed_on) == 2 and wide == passed_on


def test_tensor_override_that_matches_nothing_is_refused(tmp_path, tiny_fixed, calib):
    settings = OrtStaticSettings(tensor_overrides={"*/intermediate_act_fn/Typo": {"quant_type": "uint16"}})
    with pytest.raises(InputError, match=r"tensor_overrides '\*/intermediate_act_fn/Typo' matches no tensor"):
        quantize_variant(tmp_path, tiny_fixed, calib, "typo", settings)
