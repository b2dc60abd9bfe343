"""Recipe ort_qnn on a tiny random BERT: ONNX Runtime's QNN QDQ recipe, 16-bit activations by default."""

from __future__ import annotations

import onnx
import pytest
from helpers import matches_reference, ort_embed, qdq_bits, quantize_variant

from tasks.recipes.ort_qnn import OrtQnnSettings

SEQ = 16

def test_ort_qnn_a16w8_uses_16_bit_activations(tmp_path, tiny_fixed, calib, eval_feeds):
    out, payload = quantize_variant(tmp_path, tiny_fixed, calib, "a16w8", OrtQnnSettings())
    q = onnx.load(out / "model.onnx").graph
    inits = {i.name: i for i in q.initializer}
    zp_types = {inits[n.input[2]].data_type for n in q.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    assert onnx.TensorProto.UINT16 in zp_types
    assert payload["quantize_linear_nodes"] > 20
    assert matches_reference(ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_fixed, eval_feeds), 0.995)


def _l2norm_output_scale(model_path) -> float:
    """The scale of the QuantizeLinear on the (one) L2 LpNormalization output of a QDQ model."""
    from onnx import numpy_helper

    graph = onnx.load(model_path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    (norm,) = [n for n in graph.node if n.op_type == "LpNormalization"]
    (quantize,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == norm.output[0]]
    return float(inits[quantize.input[1]])


def test_unit_norm_output_range_sets_the_l2norm_output_to_its_exact_bound(tmp_path, tiny_fixed, calib):
    """On: the L2-normalized embedding is quantized over [-1, 1] (uint16 scale 2/65535), not its calibrated range;
    off: over the calibrated range, which a unit vector's components never fill (a smaller scale)."""
    exact, _ = quantize_variant(tmp_path, tiny_fixed, calib, "unit_on", OrtQnnSettings(unit_norm_output_range=True))
    calibrated, _ = quantize_variant(tmp_path, tiny_fixed, calib, "unit_off",
                                     OrtQnnSettings(unit_norm_output_range=False))
    assert _l2norm_output_scale(exact / "model.onnx") == pytest.approx(2 / 65535, rel=1e-6)
    assert _l2norm_output_scale(calibrated / "model.onnx") < 0.9 * 2 / 65535


def test_lowering_projections_to_8_bit_leaves_the_layernorm_and_residual_sum_at_16(tmp_path, tiny_fixed, calib,
                                                                                     eval_feeds):
    """Only the named nodes run at 8 bits: the LayerNorm feeding Q/K/V keeps 16-bit input (the residual sum, where
    BERT's outlier channels are) and output; the projections read an 8-bit copy. ORT's per-tensor fixer lowered
    the LayerNorm and its residual input with them (MiniLM: one block's Q/K/V cost cosine 0.98)."""
    qkv = ["*/attention/self/query/*", "*/attention/self/key/*", "*/attention/self/value/*"]
    out, _ = quantize_variant(tmp_path, tiny_fixed, calib, "qkv8", OrtQnnSettings(activations_8bit=qkv))
    graph = onnx.load(out / "model.onnx").graph
    producers = {o: n for n in graph.node for o in n.output}
    projections = [n for n in graph.node if n.op_type == "MatMul" and any(p in n.name for p in ("query", "key", "value"))]
    assert len(projections) == 6  # 2 layers x Q, K, V
    assert {qdq_bits(graph, n.input[0]) for n in projections} == {8}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert norms
    for norm in norms:
        assert producers[norm.input[0]].op_type == "DequantizeLinear"
        assert qdq_bits(graph, norm.input[0]) == 16, norm.name
        assert qdq_bits(graph, norm.output[0], "out") == 16, norm.name
    assert matches_reference(ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_fixed, eval_feeds), 0.99)


def test_an_activations_8bit_pattern_matching_no_node_names_that_setting(tmp_path, tiny_fixed, calib):
    from tasks.core.errors import InputError

    with pytest.raises(InputError, match=r"activations_8bit '\*/no_such_layer/\*' matches no node"):
        quantize_variant(tmp_path, tiny_fixed, calib, "bad", OrtQnnSettings(activations_8bit=["*/no_such_layer/*"]))
    assert not (tmp_path / "bad").exists()
