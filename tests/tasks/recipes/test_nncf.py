"""Recipes nncf_ptq and nncf_weights on a tiny random BERT: OpenVINO IRs that still run."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import matches_reference, ort_embed, quantize_variant

from tasks.core.errors import InputError
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


FFN_OUTPUT = r".*layer\.\d+/output/dense/MatMul"


def _float_matmuls(xml) -> set[str]:
    """MatMuls of an IR whose inputs carry no FakeQuantize (kept float)."""
    import openvino as ov

    def quantized(port) -> bool:
        source = port.get_source_output().get_node()
        while source.get_type_name() in ("Convert", "Reshape", "Transpose"):
            source = source.input(0).get_source_output().get_node()
        return source.get_type_name() == "FakeQuantize" or source.get_output_element_type(0).get_type_name() == "i8"

    model = ov.Core().read_model(str(xml))
    return {op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "MatMul" and not any(quantized(port) for port in op.inputs())}


def test_nncf_ptq_keeps_the_layers_named_by_ignored_patterns_float(tmp_path, tiny_onnx, calib):
    base, plain = quantize_variant(tmp_path, tiny_onnx, calib, "plain", NncfPtqSettings(subset_size=12))
    kept, payload = quantize_variant(tmp_path, tiny_onnx, calib, "kept",
                                     NncfPtqSettings(subset_size=12, ignored_patterns=[FFN_OUTPUT]))
    floats = _float_matmuls(kept / "model.xml") - _float_matmuls(base / "model.xml")
    assert floats and all(re.fullmatch(FFN_OUTPUT, name) for name in floats)
    assert payload["fake_quantize_ops"] < plain["fake_quantize_ops"]
    assert payload["settings"]["ignored_patterns"] == [FFN_OUTPUT]


def test_nncf_ptq_refuses_a_pattern_that_names_no_op(tmp_path, tiny_onnx, calib):
    with pytest.raises(InputError, match=r"nncf_ptq.*fix ignored_types / ignored_patterns"):
        quantize_variant(tmp_path, tiny_onnx, calib, "none", NncfPtqSettings(ignored_patterns=[".*no_such_layer.*"]))
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="not a regular expression"):
        NncfPtqSettings(ignored_patterns=["layer.("])
