"""Recipe ort_dynamic on a tiny random BERT: int8 weights, activations quantized at run time, no calibration."""

from __future__ import annotations

from helpers import matches_reference, ort_embed, quantize_variant

from tasks.recipes.ort_dynamic import OrtDynamicSettings

SEQ = 16

def test_ort_dynamic_needs_no_calibration(tmp_path, tiny_onnx, eval_feeds):
    out, payload = quantize_variant(tmp_path, tiny_onnx, None, "dyn", OrtDynamicSettings())
    assert payload["dynamic_quantize_nodes"] > 0 and payload["calibration_rows"] == 0
    assert matches_reference(ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_onnx, eval_feeds), 0.97)
