"""Recipe ort_qnn on a tiny random BERT: ONNX Runtime's QNN QDQ recipe, 16-bit activations by default."""

from __future__ import annotations

import onnx
from helpers import matches_reference, ort_embed, quantize_variant

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
