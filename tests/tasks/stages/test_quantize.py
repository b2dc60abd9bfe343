"""Stage quantize: variants are data (recipe settings by `method`), and bad inputs are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCE_ENCODER
from helpers import sentences
from pydantic import ValidationError

from tasks.config import load_config
from tasks.core.errors import InputError
from tasks.families.sentence_encoder import FAMILY
from tasks.recipes.nncf_ptq import NncfPtqSettings
from tasks.recipes.nncf_weights import NncfWeightsSettings
from tasks.recipes.none import NoQuantization
from tasks.recipes.ort_dynamic import OrtDynamicSettings
from tasks.recipes.ort_qnn import OrtQnnSettings
from tasks.recipes.ort_static import OrtStaticSettings
from tasks.stages.quantize import QuantizeParams, needs_calibration, run

SEQ = 16
REPO = Path(__file__).resolve().parents[3]
PROJECT = load_config(REPO / "params.yaml").quantize  # the project's variants

def test_project_variants_and_discriminated_settings():
    # The stage's own default is the unquantized baseline only; params.yaml defines the project's variants
    # (the settings the recipe tests' accuracy bounds were measured with).
    assert QuantizeParams().variants == {"fp32": NoQuantization()}
    variants = PROJECT.variants
    assert {"ort_qdq_a8w8", "ort_qdq_a8w8_allops", "ort_qdq_a16w8", "ort_dynamic_int8", "ov_nncf_int8",
            "ov_nncf_w8"} <= set(variants)
    assert variants["fp32"] == NoQuantization()
    assert variants["ort_qdq_a8w8"] == OrtStaticSettings(
        op_types=["MatMul", "Gemm"], gemm_linear_layers=True, float_output_op_types=["MatMul", "Gemm"],
        activation_matmuls=False,
    )
    assert variants["ort_qdq_a8w8_allops"] == OrtStaticSettings(
        softmax_input_floor=-20.0, residual_type="uint16", smooth_layernorm_alpha=0.85
    )
    assert variants["ort_qdq_a16w8"] == OrtQnnSettings()
    assert variants["ort_dynamic_int8"] == OrtDynamicSettings()
    assert variants["ov_nncf_int8"] == NncfPtqSettings()
    assert variants["ov_nncf_w8"] == NncfWeightsSettings(mode="int8_asym")
    parsed = QuantizeParams.model_validate(
        {"variants": {"a": {"method": "ort_static", "calibrate_method": "Entropy"}, "b": {"method": "nncf_weights"}}}
    )
    assert isinstance(parsed.variants["a"], OrtStaticSettings) and parsed.variants["a"].calibrate_method == "Entropy"
    assert isinstance(parsed.variants["b"], NncfWeightsSettings) and parsed.variants["b"].mode == "int8_asym"
    with pytest.raises(ValidationError, match="extra"):
        QuantizeParams.model_validate({"variants": {"a": {"method": "ort_static", "per_chanel": True}}})
    with pytest.raises(ValidationError):
        QuantizeParams.model_validate({"variants": {"a": {"method": "tflite"}}})
    assert needs_calibration(OrtStaticSettings()) and not needs_calibration(OrtDynamicSettings())


def test_unknown_variant_lists_known_ones(tmp_path, tiny_onnx, calib):
    with pytest.raises(InputError, match=r"unknown variant 'a4w4'.*ort_qdq_a8w8"):
        run(model=tiny_onnx, calibration=calib, variant="a4w4", params=PROJECT, family=SENTENCE_ENCODER,
            out_dir=tmp_path / "x", key="k")
    assert not (tmp_path / "x").exists()


def test_bad_inputs_are_one_line_input_errors(tmp_path, tiny_onnx, tiny_fixed, calib, tiny_bert):
    from transformers import AutoTokenizer

    wrong_len = tmp_path / "calib_seq8.npz"
    np.savez(wrong_len, **FAMILY.samples(AutoTokenizer.from_pretrained(tiny_bert), sentences(4, 2), 8))
    params = PROJECT
    cases = [
        (dict(calibration=wrong_len, variant="ort_qdq_a8w8"), "calibration file made for this shape"),
        (dict(calibration=None, variant="ov_nncf_int8"), "needs a calibration npz"),
        (dict(calibration=tmp_path / "nope.npz", variant="ort_qdq_a8w8"), "calibration npz not found"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            run(model=tiny_fixed, params=params, family=SENTENCE_ENCODER, out_dir=tmp_path / "o", key="k", **kwargs)
    bad_nodes = QuantizeParams(variants={"v": OrtStaticSettings(nodes_to_exclude=["/no/such/node"])})
    with pytest.raises(InputError, match="nodes_to_exclude"):
        run(model=tiny_fixed, calibration=calib, variant="v", params=bad_nodes, family=SENTENCE_ENCODER,
            out_dir=tmp_path / "o", key="k")
    with pytest.raises(InputError, match="ONNX model not found"):
        run(model=tmp_path / "missing.onnx", calibration=calib, variant="ort_qdq_a8w8", params=params,
            family=SENTENCE_ENCODER, out_dir=tmp_path / "o", key="k")
    assert not (tmp_path / "o").exists()


def test_nodes_to_exclude_takes_patterns_matched_after_ort_preprocessing(tmp_path, tiny_fixed):
    import onnx

    def integer_matmuls(settings) -> list[str]:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        run(model=tiny_fixed, calibration=None, variant="v", params=QuantizeParams(variants={"v": settings}),
            family=SENTENCE_ENCODER, out_dir=out, key="k")
        return [n.name for n in onnx.load(out / "model.onnx").graph.node if n.op_type == "MatMulInteger"]

    everything = integer_matmuls(OrtDynamicSettings())
    kept_float = integer_matmuls(OrtDynamicSettings(nodes_to_exclude=["*/intermediate/dense/*"]))
    # One FFN input layer per block (the tiny BERT has 2) stays float; every other linear layer is int8.
    assert len(everything) - len(kept_float) == 2
    assert not [n for n in kept_float if "/intermediate/dense/" in n]
    with pytest.raises(InputError, match=r"nodes_to_exclude '\*/no_such_layer/\*' matches no node"):
        integer_matmuls(OrtDynamicSettings(nodes_to_exclude=["*/no_such_layer/*"]))
