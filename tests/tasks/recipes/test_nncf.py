"""Recipes nncf_ptq and nncf_weights on a tiny random BERT: OpenVINO IRs that still run."""

from __future__ import annotations

import json

import numpy as np
from helpers import matches_reference, ort_embed, quantize_variant

from tasks.recipes.nncf_ptq import NncfPtqSettings
from tasks.recipes.nncf_weights import NncfWeightsSettings

SEQ = 16

def test_nncf_ptq_and_weight_compression(tmp_path, tiny_onnx, calib, eval_feeds):
    import openvino as ov

    out, payload = quantize_variant(tmp_path, tiny_onnx, calib, "ptq", NncfPtqSettings(subset_size=100))
    assert payload["artifact"] == "model.xml" and (out / "model.bin").is_file()
    assert payload["fake_quantize_ops"] > 10 and payload["calibration_rows"] == 12  # capped at the npz rows
    assert sorted(json.loads((out / "stage.json").read_text())["files"]) == ["model.bin", "model.xml"]
    compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = np.concatenate([compiled({k: v[i : i + 1] for k, v in eval_feeds.items()})[0] for i in range(6)])
    assert matches_reference(got, ort_embed(tiny_onnx, eval_feeds), 0.97)

    _, w8 = quantize_variant(tmp_path, tiny_onnx, None, "w8", NncfWeightsSettings())
    assert w8["fake_quantize_ops"] == 0 and w8["low_bit_weight_constants"].get("u8", 0) >= 12
    _, w4 = quantize_variant(tmp_path, tiny_onnx, None, "w4", NncfWeightsSettings(mode="int4_sym", group_size=16, ratio=1.0))
    assert w4["low_bit_weight_constants"].get("i4", 0) > 0
    assert w4["size_mb"] < w8["size_mb"] < payload["size_mb"] * 1.01
