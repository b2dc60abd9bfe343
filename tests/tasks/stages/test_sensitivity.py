"""Stage sensitivity: per layer group, a real build of the variant with only that group quantized / kept float."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import SENTENCE_ENCODER, STSB_TEST

from tasks.core.errors import InputError
from tasks.core.fingerprint import read_stamp
from tasks.core.schemas import SENSITIVITY_ROWS
from tasks.data.evaluation import SentencePairsSet
from tasks.recipes.nncf_ptq import NncfPtqSettings
from tasks.recipes.ort_static import OrtStaticSettings
from tasks.stages.quantize import QuantizeParams
from tasks.stages.sensitivity import SensitivityParams, run

STSB = SentencePairsSet(name="stsb", format="sentence_pairs", reader="stsb", path=STSB_TEST)
SABOTAGED = "/encoder/encoder/layer.1/intermediate/dense"


# ort_qdq_a8w8 of params.yaml: each linear layer one Gemm (its input the `<MatMul>/gemm_input` reshape)
A8W8 = dict(op_types=["MatMul", "Gemm"], gemm_linear_layers=True, float_output_op_types=["MatMul", "Gemm"],
            activation_matmuls=False)


def _run(model, calib, tiny_bert, out, settings, **params):
    return run(model=model, calibration=calib, model_dir=tiny_bert, model_name="dense", variant="v", seq_len=16,
               params=SensitivityParams(items=24, calibration_rows=12, threads=1, **params),
               quantize_params=QuantizeParams(variants={"v": settings}), family=SENTENCE_ENCODER, eval_set=STSB,
               out_dir=out, key="k")


def test_the_group_whose_quantization_breaks_the_model_ranks_first(tiny_fixed, calib, tiny_bert, tmp_path, one_thread):
    # One layer's input quantized over a range 1000x too narrow: quantizing that group alone must cost the most,
    # and keeping it alone in float must recover the most.
    settings = OrtStaticSettings(**A8W8, tensor_overrides={f"{SABOTAGED}/MatMul/gemm_input": {"rmin": -1e-3, "rmax": 1e-3}})
    payload = _run(tiny_fixed, calib, tiny_bert, tmp_path / "out", settings)
    table = SENSITIVITY_ROWS.validate(pd.read_csv(tmp_path / "out" / "sensitivity.csv"))
    groups = list(dict.fromkeys(table.loc[table["probe"] != "variant", "group"]))
    # Two layers x (query+key+value, attention output, FFN in, FFN out), in graph order.
    assert len(groups) == 8 and groups[0] == "/encoder/encoder/layer.0/attention/self/query+key+value"
    assert SABOTAGED in groups and payload["groups"] == 8 and len(table) == 1 + 8 * 2
    # Losses of cosine to fp32 (the tiny random BERT's embeddings barely move, so compare them as ratios).
    alone = 1 - table[table["probe"] == "alone"].set_index("group")["cosine_to_fp32"]
    kept = 1 - table[table["probe"] == "kept"].set_index("group")["cosine_to_fp32"]
    full = 1 - table[table["probe"] == "variant"].iloc[0]["cosine_to_fp32"]
    assert alone.idxmax() == SABOTAGED and alone[SABOTAGED] > 10 * alone.drop(SABOTAGED).max()
    assert kept.idxmin() == SABOTAGED and kept[SABOTAGED] < full / 10 < kept.drop(SABOTAGED).min()
    assert (table["eval_items"] == 24).all() and table["metric_name"].eq("spearman").all()
    qkv = table[(table["group"] == groups[0]) & (table["probe"] == "alone")].iloc[0]
    assert qkv["layers"] == 3 and qkv["macs"] == 3 * 16 * 32 * 32
    assert read_stamp(tmp_path / "out")["probes"] == 16


def test_a_recipe_that_cannot_keep_layers_float_is_one_line(tiny_fixed, calib, tiny_bert, tmp_path):
    with pytest.raises(InputError, match="cannot keep single layers in float"):
        _run(tiny_fixed, calib, tiny_bert, tmp_path / "out", NncfPtqSettings())
    assert not (tmp_path / "out").exists()
