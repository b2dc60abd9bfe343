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
from tasks.stages.sensitivity import SensitivityParams, choose_higher_groups, run

STSB = SentencePairsSet(name="stsb", format="sentence_pairs", reader="stsb", path=STSB_TEST)
SABOTAGED = "/encoder/encoder/layer.1/intermediate/dense"


# ort_qdq_a8w8 of params.yaml: each linear layer one Gemm (its input the `<MatMul>/gemm_input` reshape)
A8W8 = dict(op_types=["MatMul", "Gemm"], gemm_linear_layers=True, float_output_op_types=["MatMul", "Gemm"],
            activation_matmuls=False)


def _run(model, calib, tiny_bert, out, settings, mixed=None, **params):
    return run(model=model, calibration=calib, model_dir=tiny_bert, model_name="dense", variant="v", seq_len=16,
               params=SensitivityParams(items=24, calibration_rows=12, threads=1, **params),
               quantize_params=QuantizeParams(variants={"v": settings}), family=SENTENCE_ENCODER, eval_set=STSB,
               out_dir=out, key="k", mixed=mixed)


def test_the_group_whose_quantization_breaks_the_model_ranks_first(tiny_fixed, calib, tiny_bert, tmp_path, one_thread):
    # One layer's input quantized over a range 1000x too narrow: quantizing that group alone must cost the most,
    # and keeping it alone in float must recover the most.
    settings = OrtStaticSettings(**A8W8, tensor_overrides={f"{SABOTAGED}/MatMul/gemm_input": {"rmin": -1e-3, "rmax": 1e-3}})
    payload = _run(tiny_fixed, calib, tiny_bert, tmp_path / "out", settings)
    table = SENSITIVITY_ROWS.validate(pd.read_csv(tmp_path / "out" / "sensitivity.csv"))
    groups = list(dict.fromkeys(table.loc[table["probe"] != "all", "group"]))
    # Two layers x (query+key+value, attention output, FFN in, FFN out), in graph order.
    assert len(groups) == 8 and groups[0] == "/encoder/encoder/layer.0/attention/self/query+key+value"
    assert SABOTAGED in groups and payload["groups"] == 8 and len(table) == 1 + 8 * 2
    # Losses of cosine to fp32 (the tiny random BERT's embeddings barely move, so compare them as ratios).
    alone = 1 - table[table["probe"] == "alone"].set_index("group")["cosine_to_fp32"]
    kept = 1 - table[table["probe"] == "kept"].set_index("group")["cosine_to_fp32"]
    full = 1 - table[table["probe"] == "all"].iloc[0]["cosine_to_fp32"]
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


def _groups(*spec):
    from tasks.transforms.layer_groups import LayerGroup

    return [LayerGroup(name, (name,), (f"{name}/*",), macs) for name, macs in spec]


def test_the_choice_is_the_shortest_prefix_by_gain_per_mac_that_holds_on_the_whole_set():
    groups = _groups(("qkv", 300), ("ffn_in", 400), ("ffn_out", 400), ("out", 100))
    gains = {"qkv": 0.3, "ffn_in": 0.1, "ffn_out": 0.8, "out": 0.05}  # per MAC: ffn_out, qkv, out, ffn_in

    def loss(chosen, start):  # as if each group at the higher precision gave back its gain
        return start - sum(gains[g.name] for g in chosen)

    def choose(subset_start, full_start):
        chosen, steps = choose_higher_groups(groups, gains, 0.3, lambda c: loss(c, subset_start),
                                             lambda c: loss(c, full_start))
        return [g.name for g in chosen], [(s["on"], s["higher_groups"]) for s in steps]

    # Two groups bring the subset within 0.3; the whole set loses more: two more, one step at a time.
    assert choose(1.2, 1.5) == (["ffn_out", "qkv", "out", "ffn_in"],
                                [("subset", 0), ("subset", 1), ("subset", 2), ("full", 0), ("full", 2), ("full", 3),
                                 ("full", 4)])
    # The subset overstates the loss: the whole set needs fewer groups, found by bisection below its answer.
    assert choose(1.3, 1.0) == (["ffn_out"], [("subset", 0), ("subset", 1), ("subset", 2), ("full", 0), ("full", 2),
                                              ("full", 1)])
    # Out of budget on the subset but within it on the whole set: no group (measured there first).
    assert choose(0.4, 0.2) == ([], [("subset", 0), ("subset", 1), ("full", 0)])
    # Groups that gained nothing alone follow, cheapest first: here only together with them is the budget held.
    chosen, steps = choose_higher_groups(groups, {"out": 0.05}, 0.3, lambda c: 2.0 - 0.6 * (len(c) >= 3),
                                         lambda c: 2.0 - 1.8 * (len(c) >= 3))
    assert [g.name for g in chosen] == ["out", "qkv", "ffn_in"]
    # Out of reach even with every group at the higher precision (the base): all of them, and the loss says so.
    chosen, steps = choose_higher_groups(groups, {"out": 0.05}, 0.3, lambda c: 2.0, lambda c: 2.0)
    assert len(chosen) == 4 and steps[-1] == {"on": "full", "higher_groups": 4, "loss": 2.0}


def test_the_assignment_states_the_loss_of_the_chosen_prefix_not_of_the_last_step():
    from tasks.stages.sensitivity import chosen_loss

    # A bisection between 0 (failing) and 4 (passing) that ends on 3 failing: the choice is 4, its loss 0.2.
    steps = [{"on": "subset", "higher_groups": 4, "loss": 0.1}, {"on": "full", "higher_groups": 0, "loss": 1.0},
             {"on": "full", "higher_groups": 4, "loss": 0.2}, {"on": "full", "higher_groups": 2, "loss": 0.6},
             {"on": "full", "higher_groups": 3, "loss": 0.4}]
    assert chosen_loss(steps, 4) == 0.2


@pytest.fixture(scope="module")
def self_scored(tiny_fixed, tiny_bert, tmp_path_factory) -> SentencePairsSet:
    """Pairs scored by the tiny fp32 model's own cosine: fp32 scores Spearman 100, and any change of the
    outputs shows in the metric (the tiny random BERT barely separates sentences otherwise)."""
    import numpy as np
    from helpers import run_outputs, sentences

    from tasks.families.sentence_encoder import FAMILY

    left, right = sentences(80, 7), sentences(80, 8)
    tokenizer = FAMILY.load_preprocessor(tiny_bert)
    a, b = (run_outputs(tiny_fixed, FAMILY.samples(tokenizer, texts, 16)) for texts in (left, right))
    score = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    pd.DataFrame({"sentence1": left, "sentence2": right, "score": score}).to_csv(path, index=False)
    return SentencePairsSet(name="own", path=path)


@pytest.mark.parametrize("rank_by", ["metric", "cosine"])
def test_auto_mixed_keeps_the_breaking_group_float_and_writes_what_to_paste(tiny_fixed, calib, tiny_bert, tmp_path,
                                                                             self_scored, one_thread, rank_by):
    import yaml
    from pydantic import TypeAdapter

    from tasks.recipes import variant_settings

    settings = OrtStaticSettings(**A8W8, tensor_overrides={f"{SABOTAGED}/MatMul/gemm_input": {"rmin": -1e-3, "rmax": 1e-3}})
    out = tmp_path / "out"
    payload = run(model=tiny_fixed, calibration=calib, model_dir=tiny_bert, model_name="dense", variant="v", seq_len=16,
                  params=SensitivityParams(items=40, calibration_rows=12, threads=1, probes=["kept"], rank_by=rank_by),
                  quantize_params=QuantizeParams(variants={"v": settings}), family=SENTENCE_ENCODER,
                  eval_set=self_scored, out_dir=out, key="k", mixed={"v_mixed": 0.01})
    assignment = payload["assignments"]["v_mixed"]
    steps = assignment["steps"]
    assert steps[0]["on"] == "subset" and steps[0]["loss"] > 0.01  # the sabotaged variant is out of budget
    assert assignment["higher_groups"] == [SABOTAGED] and assignment["within_budget"]
    assert (assignment["higher_layers"], assignment["layers"]) == (1, 12)  # 2 x (query, key, value, out, FFN in/out)
    assert steps[-1]["on"] == "full" and steps[-1]["loss"] <= 0.01 and assignment["eval_items"] == 80
    assert f"{SABOTAGED}/*" in assignment["settings"]["nodes_to_exclude"] and assignment["axis"] == "float"
    # What to paste: the base's own settings with those patterns, a valid variant of its recipe.
    pasted = yaml.safe_load((out / "override-v_mixed.yaml").read_text())["quantize"]["variants"]["v_mixed"]
    built = TypeAdapter(variant_settings()).validate_python(pasted)
    assert built.method == "ort_static" and built.nodes_to_exclude == assignment["settings"]["nodes_to_exclude"]
    assert built.tensor_overrides == settings.tensor_overrides and built.calibration_rows is None


def test_recipe_auto_mixed_builds_the_assignment_and_refuses_a_broken_one(tiny_fixed, calib, tmp_path):
    import json

    from helpers import quantize_variant

    from tasks.recipes.auto_mixed import AutoMixedSettings
    from tasks.stages.quantize import run as quantize_run

    base = OrtStaticSettings(**A8W8, nodes_to_exclude=[f"{SABOTAGED}/*"])
    path = tmp_path / "assignment-m.json"
    path.write_text(json.dumps({"settings": base.model_dump(mode="json"), "higher_groups": [SABOTAGED], "loss": 0.1,
                                "within_budget": True}))
    mixed = AutoMixedSettings(base="v")

    def build(folder, assignment):
        return quantize_run(model=tiny_fixed, calibration=calib, variant="m", params=QuantizeParams(variants={"m": mixed}),
                            family=SENTENCE_ENCODER, out_dir=tmp_path / folder, key="k", imports={"assignment": assignment})

    payload = build("mixed", path)
    same, _ = quantize_variant(tmp_path, tiny_fixed, calib, "base", base)
    assert (tmp_path / "mixed" / "model.onnx").read_bytes() == (same / "model.onnx").read_bytes()
    assert payload["higher_groups"] == [SABOTAGED] and payload["method"] == "auto_mixed"
    path.write_text("{not json")
    with pytest.raises(InputError, match=r"assignment-m.json: not an assignment the sensitivity stage wrote"):
        build("broken", path)
    assert not (tmp_path / "broken").exists()


def test_each_axis_places_groups_through_its_own_setting():
    from tasks.recipes.ort_qnn import OrtQnnSettings
    from tasks.stages.sensitivity import placed

    groups = _groups(("qkv", 300), ("ffn_in", 400), ("ffn_out", 400))
    # float: the higher groups join nodes_to_exclude (after the variant's own), calibration trimmed for probes.
    cpu = placed(OrtStaticSettings(**A8W8, nodes_to_exclude=["x"]), "float", groups, groups[1:2], 16)
    assert cpu.nodes_to_exclude == ["x", "ffn_in/*"] and cpu.calibration_rows == 16
    # a8: every group not at the higher precision gets 8-bit activations.
    htp = placed(OrtQnnSettings(), "a8", groups, groups[1:2], None)
    assert htp.activations_8bit == ["qkv/*", "ffn_out/*"] and htp.nodes_to_exclude == [] and htp.calibration_rows is None


def test_axis_a8_probes_a_16_bit_qnn_variant_and_refuses_others(tiny_fixed, calib, tiny_bert, tmp_path, one_thread):
    from tasks.recipes.ort_qnn import OrtQnnSettings

    _run(tiny_fixed, calib, tiny_bert, tmp_path / "out", OrtQnnSettings(), axes={"v": "a8"}, probes=["alone"])
    table = SENSITIVITY_ROWS.validate(pd.read_csv(tmp_path / "out" / "sensitivity.csv"))
    assert list(table["probe"]) == ["all"] + ["alone"] * 8 and (table["axis"] == "a8").all()
    with pytest.raises(InputError, match="is not a uint16 ort_qnn variant"):
        _run(tiny_fixed, calib, tiny_bert, tmp_path / "other", OrtStaticSettings(**A8W8), axes={"v": "a8"})
