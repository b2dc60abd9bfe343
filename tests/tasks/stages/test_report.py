"""The report stage: the benchmark.csv / evaluation.csv results contract, the budget on every set, the seq-len choice."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import SENTENCE_ENCODER

from tasks.core.errors import StageError
from tasks.data.text import TextSource
from tasks.stages.report import ReportParams, choose, collect_rows
from tasks.stages.report import run as report_run

KEY = ("model", "variant", "device", "target", "seq_len")


def _row(**overrides):
    row = {
        "model": "dense", "source_model": "m", "variant": "fp32", "device": "ort_cpu", "seq_len": 128,
        "artifact": "artifacts/quantize/dense/fp32-128/model.onnx", "artifact_sha256": "0" * 64, "size_mb": 90.3,
        "latency_p50_ms": 20.0, "latency_p90_ms": 22.0, "latency_p99_ms": 25.0, "latency_mean_ms": 20.5,
        "latency_std_ms": 1.0, "timed_runs": 100, "cold_start_ms": 400.0, "threads": 2, "precision": "fp32",
        "eval_set": "stsb", "metric_name": "spearman", "metric_value": 82.03, "higher_is_better": True,
        "eval_items": 1379, "eval_total_items": 1379, "stsb_spearman": 82.03, "cosine_to_fp32_mean": 1.0, "cosine_to_fp32_min": 1.0,
        "engine_version": "1.31.1", "dvc_stage": "benchmark@dense-target0-128", "target": "host",
        "simulated": False, "quick": False, "timing_repeats": 3, "latency_p50_spread_pct": 1.5,
        "latency_stable": True, "throughput_per_s": 48.8, "warm_start_ms": 300.0, "peak_rss_mb": 250.0,
        "accuracy_source": "artifact", "sim_items": None, "sim_metric_value": None,
        "sim_cosine_to_cpu_ep_mean": None, "sim_cosine_to_cpu_ep_min": None, "cpu_model": "AMD EPYC",
        "cpu_flags": "avx2 fma", "tool_versions": "numpy 2.3; onnxruntime 1.31.1",
    }
    if "metric_value" in overrides and "stsb_spearman" not in overrides:
        overrides = {**overrides, "stsb_spearman": overrides["metric_value"]}
    return {**row, **overrides}


def _scores(row, **other_sets):
    """The benchmark stage's `evaluations` of a row: its first set, plus other sets' values by name."""
    first = {"eval_set": row["eval_set"], "metric_name": row["metric_name"], "metric_value": row["metric_value"],
             "higher_is_better": row["higher_is_better"], "items": row["eval_items"],
             "total_items": row["eval_total_items"],
             "accuracy_source": row["accuracy_source"]}
    extra = [{**first, "eval_set": name, "metric_value": value, "items": 100, "total_items": 100}
             for name, value in other_sets.items()]
    return [{**{k: row[k] for k in KEY}, **s} for s in (first, *extra)]


def _bench_dir(tmp_path, name, *rows, other_sets=None):
    folder = tmp_path / name
    folder.mkdir()
    evaluations = [s for r in rows for s in _scores(r, **(other_sets or {}).get(r["variant"], {}))]
    (folder / "stage.json").write_text(
        json.dumps({"key": "k", "files": [], "rows": list(rows), "evaluations": evaluations, "skipped": []})
    )
    return folder


def _report(dirs, params, out, text, tokenizer_dir, **kwargs):
    return report_run(dirs, params, SENTENCE_ENCODER, out, key="k", model_dir=tokenizer_dir, text=text, **kwargs)


@pytest.fixture
def inputs_txt(tmp_path):
    """Inputs whose lengths the seq-len choice counts: 200 short sentences and 2 long ones (1 %)."""
    path = tmp_path / "inputs.txt"
    lines = [f"sentence number {i} is short." for i in range(200)] + [" ".join(["long"] * 300) + f" {i}" for i in range(2)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _txt(path):
    return ReportParams().seq_len_choice.model_copy(update={"text": TextSource(path=path, format="txt")})


def test_report_writes_validated_csv_and_summary(tmp_path, tiny_bert, inputs_txt):
    dirs = [
        _bench_dir(tmp_path, "a", _row()),
        _bench_dir(tmp_path, "b", _row(seq_len=512)),
        _bench_dir(tmp_path, "c", _row(variant="int8_ok", metric_value=81.6, latency_p50_ms=8.0)),
        _bench_dir(tmp_path, "d", _row(variant="int8_bad", metric_value=38.6, latency_p50_ms=5.0)),
    ]
    params = ReportParams(accuracy_budget=0.5, seq_len_choice=_txt(inputs_txt))
    _report(dirs, params, tmp_path / "metrics", inputs_txt, tiny_bert)
    table = pd.read_csv(tmp_path / "metrics" / "benchmark.csv").set_index("variant")
    assert table.loc["int8_ok", "within_budget"] and not table.loc["int8_bad", "within_budget"]
    assert table.loc["int8_bad", "metric_drop"] == pytest.approx(82.03 - 38.6)
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert summary["dense/fp32/ort_cpu/host/512"]["metric_value"] == pytest.approx(82.03)
    # 200 of the 202 inputs fit in 128 tokens (99.0 %): the shorter length is enough, with its fastest
    # within-budget variant; the 512 row's latency is the cost avoided.
    choice = summary["seq_len_choice"]["choice"]["ort_cpu/host"]
    assert (choice["seq_len"], choice["variant"], choice["latency_p50_ms"]) == (128, "int8_ok", 8.0)
    assert choice["covered_share"] == pytest.approx(200 / 202) and "2.5x faster than at 512 tokens" in choice["reason"]
    candidates = pd.read_csv(tmp_path / "metrics" / "seq_len_choice.csv")
    assert list(candidates["seq_len"]) == [128, 512] and list(candidates["chosen"]) == [True, False]
    # The faster but broken variant is never the winner.
    assert summary["best_within_budget"]["ort_cpu/128"]["variant"] == "int8_ok"
    assert summary["best_within_budget"]["ort_cpu/512"]["variant"] == "fp32"


def test_pruned_rows_are_judged_against_dense_and_their_own_fp32(tmp_path, tiny_bert, inputs_txt):
    dirs = [
        _bench_dir(tmp_path, "a", _row()),
        _bench_dir(tmp_path, "b", _row(model="pruned", metric_value=81.0, latency_p50_ms=12.0)),
        _bench_dir(tmp_path, "c", _row(model="pruned", variant="int8", metric_value=80.8, latency_p50_ms=6.0)),
    ]
    params = ReportParams(accuracy_budget=1.5, seq_len_choice=_txt(inputs_txt))
    _report(dirs, params, tmp_path / "metrics", inputs_txt, tiny_bert)
    table = pd.read_csv(tmp_path / "metrics" / "benchmark.csv").set_index(["model", "variant"])
    assert table.loc[("pruned", "int8"), "metric_drop"] == pytest.approx(82.03 - 80.8)
    assert table.loc[("pruned", "int8"), "drop_vs_own_fp32"] == pytest.approx(81.0 - 80.8)
    assert table.loc[("dense", "fp32"), "drop_vs_own_fp32"] == 0
    best = json.loads((tmp_path / "metrics" / "summary.json").read_text())["best_within_budget"]["ort_cpu/128"]
    assert (best["model"], best["variant"]) == ("pruned", "int8")


def test_budget_holds_on_every_evaluation_set(tmp_path, tiny_bert, inputs_txt):
    """Within budget on the first set but 2 points down on another: not within budget, and never recommended."""
    sets = {"fp32": {"heldout": 77.0}, "int8": {"heldout": 75.0}, "int8_ok": {"heldout": 76.9}}
    dirs = [
        _bench_dir(tmp_path, "a", _row(), other_sets=sets),
        _bench_dir(tmp_path, "b", _row(variant="int8", metric_value=81.9, latency_p50_ms=6.0), other_sets=sets),
        _bench_dir(tmp_path, "c", _row(variant="int8_ok", metric_value=81.8, latency_p50_ms=9.0), other_sets=sets),
    ]
    _report(dirs, ReportParams(accuracy_budget=0.5, seq_len_choice=_txt(inputs_txt)), tmp_path / "m", inputs_txt,
            tiny_bert)
    table = pd.read_csv(tmp_path / "m" / "benchmark.csv").set_index("variant")
    assert table.loc["int8", "metric_drop"] == pytest.approx(82.03 - 81.9) and not table.loc["int8", "within_budget"]
    assert table.loc["int8_ok", "within_budget"]
    per_set = pd.read_csv(tmp_path / "m" / "evaluation.csv").set_index(["variant", "eval_set"])
    assert per_set.loc[("int8", "heldout"), "drop"] == pytest.approx(2.0)
    assert per_set.loc[("int8", "stsb"), "within_budget"] and not per_set.loc[("int8", "heldout"), "within_budget"]
    best = json.loads((tmp_path / "m" / "summary.json").read_text())["best_within_budget"]["ort_cpu/128"]
    assert best["variant"] == "int8_ok"


def test_lower_is_better_metrics_are_judged_in_their_direction(tmp_path, tiny_bert, inputs_txt):
    dirs = [_bench_dir(tmp_path, "a", _row(metric_name="error", metric_value=10.0, higher_is_better=False)),
            _bench_dir(tmp_path, "b", _row(variant="int8", metric_name="error", metric_value=10.4,
                                           higher_is_better=False))]
    _report(dirs, ReportParams(accuracy_budget=0.5, seq_len_choice=_txt(inputs_txt)), tmp_path / "m", inputs_txt,
            tiny_bert)
    table = pd.read_csv(tmp_path / "m" / "benchmark.csv").set_index("variant")
    assert table.loc["int8", "metric_drop"] == pytest.approx(0.4) and table.loc["int8", "within_budget"]


def test_budget_needs_an_fp32_row(tmp_path, tiny_bert, inputs_txt):
    with pytest.raises(StageError, match=r"no fp32 row for \['dense@128'\]"):
        _report([_bench_dir(tmp_path, "a", _row(variant="int8"))], ReportParams(seq_len_choice=_txt(inputs_txt)),
                tmp_path / "m", inputs_txt, tiny_bert)


def test_seq_len_choice_takes_the_smallest_length_covering_the_share():
    lengths = np.array([10] * 95 + [100] * 4 + [300])  # 95 % fit 64, 99 % fit 128, all fit 384
    latency = pd.DataFrame({
        "device": "ort_cpu", "target": "host", "seq_len": [64, 128, 384], "model": "dense", "variant": "int8",
        "latency_p50_ms": [2.0, 4.0, 16.0], "measured_by": ["latency_curve", "benchmark", "latency_curve"],
        "simulated": False,
    })
    table, choice = choose(lengths, latency, coverage=0.99)
    assert choice["ort_cpu/host"]["seq_len"] == 128 and list(table["truncated_share"]) == [0.05, 0.01, 0.0]
    assert choose(lengths, latency, coverage=0.999)[1]["ort_cpu/host"]["seq_len"] == 384
    assert choose(lengths, latency, coverage=0.9)[1]["ort_cpu/host"]["measured_by"] == "latency_curve"
    # Nothing measured covers the share: the longest, and the reason says to measure longer lengths.
    short = choose(lengths, latency[latency["seq_len"] < 384], coverage=0.999)[1]["ort_cpu/host"]
    assert short["seq_len"] == 128 and "measure longer lengths" in short["reason"]


def test_simulated_and_quick_rows_may_have_few_runs_and_are_marked(tmp_path):
    sim = _row(device="qnn_htp", variant="int8", target="snapdragon_8_gen_3", simulated=True, timed_runs=3,
               timing_repeats=1, latency_p50_spread_pct=None, latency_stable=False, warm_start_ms=None,
               accuracy_source="cpu_ep_same_graph", sim_items=32, sim_metric_value=80.1,
               sim_cosine_to_cpu_ep_mean=0.9995, sim_cosine_to_cpu_ep_min=0.999)
    table, _ = collect_rows([_bench_dir(tmp_path, "a", _row(quick=True, timed_runs=10), sim)])
    assert list(table["simulated"]) == [False, True] and list(table["quick"]) == [True, False]
    with pytest.raises(StageError, match="timed_runs >= 50 unless simulated or quick"):
        collect_rows([_bench_dir(tmp_path, "b", _row(timed_runs=10))])


def test_two_compile_targets_of_one_variant_are_two_rows(tmp_path):
    rows = [_row(device="qnn_htp", target=t, simulated=True, timed_runs=3) for t in ("soc_a", "soc_b")]
    assert list(collect_rows([_bench_dir(tmp_path, "a", *rows)])[0]["target"]) == ["soc_a", "soc_b"]


@pytest.mark.parametrize(
    "bad",
    [_row(latency_p50_ms=-1.0), _row(timed_runs=10), _row(artifact_sha256="abc"), _row(accuracy_source="guess")],
)
def test_rows_breaking_the_contract_are_refused(tmp_path, bad):
    with pytest.raises(StageError, match="schema"):
        collect_rows([_bench_dir(tmp_path, "a", bad)])


def test_duplicate_rows_are_refused(tmp_path):
    with pytest.raises(StageError, match="schema"):
        collect_rows([_bench_dir(tmp_path, "a", _row()), _bench_dir(tmp_path, "b", _row())])


def test_missing_benchmark_output(tmp_path):
    with pytest.raises(StageError, match="run its benchmark stage first"):
        collect_rows([tmp_path / "never-ran"])


def test_the_pruning_search_walk_becomes_a_table_and_a_verdict(tmp_path, tiny_bert, inputs_txt):
    dirs = [_bench_dir(tmp_path, "a", _row())]
    level = {"head_ratio": 0.25, "ffn_ratio": 0.5, "distill_steps": 300, "encoder_weights_kept": 0.58,
             "scores": {"stsb@128": 81.9, "lee50@128": 69.8}, "drops": {"stsb@128": 0.1, "lee50@128": 0.2},
             "worst_drop": 0.2, "within_budget": True}
    searched = tmp_path / "prune_pruned"
    searched.mkdir()
    (searched / "stage.json").write_text(json.dumps({"key": "k", "files": [], "model": "pruned", "search": {
        "budget": 0.5, "dense": {"stsb@128": 82.0, "lee50@128": 70.0}, "levels": [level], "chosen": 0,
        "met_budget": True}}))
    fixed = tmp_path / "prune_dense"
    fixed.mkdir()
    (fixed / "stage.json").write_text(json.dumps({"key": "k", "files": [], "model": "dense"}))  # no search
    _report(dirs, ReportParams(seq_len_choice=_txt(inputs_txt)), tmp_path / "out", inputs_txt, tiny_bert,
            prune_dirs=[fixed, searched])
    table = pd.read_csv(tmp_path / "out" / "prune_search.csv")
    assert table[["eval_set", "seq_len", "dense_value", "metric_value", "drop"]].values.tolist() == [
        ["stsb", 128, 82.0, 81.9, 0.1], ["lee50", 128, 70.0, 69.8, 0.2]]
    assert table["chosen"].all() and table["level_within_budget"].all() and set(table["model"]) == {"pruned"}
    verdict = json.loads((tmp_path / "out" / "summary.json").read_text())["prune_search"]
    assert verdict == {"pruned": {"met_budget": True, "chosen": level, "levels_tried": 1}}


def _bundle_row(variant, policy, shapes, mean_ms, truncated=0, metric=None, **extra):
    return {"model": "dense", "variant": variant, "device": "ort_cpu", "target": "host", "policy": policy,
            "shapes": shapes, "contexts": len(shapes.split("/")), "size_mb": 20.0 * len(shapes.split("/")),
            "mix_inputs": 200, "truncated_inputs": truncated, "bucket_counts": "{}", "latency_mix_mean_ms": mean_ms,
            "latency_mix_p50_ms": mean_ms, "latency_mix_p99_ms": 2 * mean_ms, "metric_name": "spearman",
            "metric_value": metric, "cosine_to_fp32_mean": 1.0, "accuracy_source": "artifact",
            "eval_truncated_inputs": 0, "threads": 2, "simulated": False, "cpu_model": "AMD EPYC",
            "cpu_flags": "avx2", "engine_version": "1.31.1", "tool_versions": "onnxruntime 1.31.1", **extra}


def _bundle_dir(tmp_path, name, buckets_metric, *rows):
    folder = tmp_path / name
    folder.mkdir()
    routed = [r for r in rows if r["policy"] != "static"]  # the first scores `buckets_metric`, others their own
    evaluations = [{k: r[k] for k in ("model", "variant", "device", "target", "policy")} | {
        "eval_set": "stsb", "metric_name": "spearman", "metric_value": r["metric_value"] if i else buckets_metric,
        "higher_is_better": True, "items": 1379, "total_items": 1379, "accuracy_source": "artifact"}
        for i, r in enumerate(routed)]
    (folder / "stage.json").write_text(json.dumps({"key": "k", "files": [], "rows": list(rows),
                                                   "evaluations": evaluations, "skipped": []}))
    return folder


def test_buckets_win_when_faster_on_the_users_inputs_within_budget(tmp_path, tiny_bert, inputs_txt):
    """Static 16 is fastest but cuts 30 % of the inputs; static 128 keeps them and costs 8 ms; the int8 bundle
    routes them for 3 ms and is within budget; a broken bundle (-5 points) is faster still and never chosen."""
    bench = [_bench_dir(tmp_path, "a", _row(), _row(seq_len=16, metric_value=60.0)),
             _bench_dir(tmp_path, "b", _row(variant="int8", metric_value=81.8),
                        _row(variant="int8", seq_len=16, metric_value=59.0))]
    bundles = [
        _bundle_dir(tmp_path, "fp32", 82.0, _bundle_row("fp32", "buckets", "16/128", 5.0, metric=82.0),
                    _bundle_row("fp32", "static", "16", 2.0, truncated=60), _bundle_row("fp32", "static", "128", 12.0)),
        _bundle_dir(tmp_path, "int8", 81.9, _bundle_row("int8", "buckets", "16/128", 3.0, metric=81.9),
                    _bundle_row("int8", "static", "16", 1.5, truncated=60), _bundle_row("int8", "static", "128", 8.0)),
        _bundle_dir(tmp_path, "broken", 77.0, _bundle_row("broken", "buckets", "16/128", 1.0, metric=77.0)),
    ]
    params = ReportParams(accuracy_budget=0.5, seq_len_choice=_txt(inputs_txt))
    _report(bench, params, tmp_path / "metrics", inputs_txt, tiny_bert, bundle_dirs=bundles)
    table = pd.read_csv(tmp_path / "metrics" / "bundles.csv").set_index(["variant", "policy", "shapes"])
    assert table.loc[("int8", "buckets", "16/128"), "metric_drop"] == pytest.approx(0.1)  # vs the fp32 bundle
    assert not table.loc[("broken", "buckets", "16/128"), "within_budget"]
    # Static rows take the benchmark's verdict at their length; coverage counts the inputs they cut.
    assert table.loc[("int8", "static", "128"), "metric_value"] == pytest.approx(81.8)
    assert table.loc[("int8", "static", "16"), "covered_share"] == pytest.approx(0.7)
    choice = json.loads((tmp_path / "metrics" / "summary.json").read_text())["shape_choice"]["ort_cpu/host"]
    assert (choice["policy"], choice["variant"], choice["shapes"]) == ("buckets", "int8", "16/128")
    assert choice["vs_static"]["shapes"] == "128" and choice["vs_static"]["speedup"] == pytest.approx(8 / 3)
    assert "2.67x faster on your inputs than static 128" in choice["reason"] and "+1 artifacts" in choice["reason"]
    # A cap on bundle size leaves the static length.
    _report(bench, params.model_copy(update={"max_bundle_mb": 30.0}), tmp_path / "capped", inputs_txt, tiny_bert,
            bundle_dirs=bundles)
    capped = json.loads((tmp_path / "capped" / "summary.json").read_text())["shape_choice"]["ort_cpu/host"]
    assert (capped["policy"], capped["shapes"], capped["variant"]) == ("static", "128", "int8")


def test_a_dynamic_artifact_is_judged_against_static_fp32_and_wins_when_fastest(tmp_path, tiny_bert, inputs_txt):
    """A dynamic int8 row (each input at its own length up to 128) is judged against the dense fp32 at static 128
    (same tokens, padding masked out); it beats the buckets and the static rows on the user's inputs and says so.
    A dynamic row outside the budget is faster still and never chosen."""
    bench = [_bench_dir(tmp_path, "a", _row(), _row(seq_len=16, metric_value=60.0)),
             _bench_dir(tmp_path, "b", _row(variant="int8", metric_value=81.8))]
    bundles = [
        _bundle_dir(tmp_path, "fp32", 82.03, _bundle_row("fp32", "buckets", "16/128", 5.0, metric=82.03),
                    _bundle_row("fp32", "static", "128", 12.0)),
        _bundle_dir(tmp_path, "int8", 81.9, _bundle_row("int8", "buckets", "16/128", 3.0, metric=81.9),
                    _bundle_row("int8", "static", "128", 8.0)),
        _bundle_dir(tmp_path, "int8_dyn", 81.73, _bundle_row("int8_dyn", "dynamic", "<=128", 2.0, metric=81.73)),
        _bundle_dir(tmp_path, "bad_dyn", 80.0, _bundle_row("bad_dyn", "dynamic", "<=128", 1.0, metric=80.0)),
        _bundle_dir(tmp_path, "ov_dyn", 82.0, _bundle_row("ov_dyn", "dynamic", "<=128", 1.9, metric=82.0,
                                                           device="openvino_cpu")),
    ]
    params = ReportParams(accuracy_budget=0.5, seq_len_choice=_txt(inputs_txt))
    _report(bench, params, tmp_path / "metrics", inputs_txt, tiny_bert, bundle_dirs=bundles)
    table = pd.read_csv(tmp_path / "metrics" / "bundles.csv").set_index(["variant", "policy", "shapes"])
    assert table.loc[("int8_dyn", "dynamic", "<=128"), "metric_drop"] == pytest.approx(0.3)  # vs fp32 at static 128
    assert table.loc[("int8_dyn", "dynamic", "<=128"), "within_budget"]
    assert not table.loc[("bad_dyn", "dynamic", "<=128"), "within_budget"]
    choice = json.loads((tmp_path / "metrics" / "summary.json").read_text())["shape_choice"]["ort_cpu/host"]
    assert (choice["policy"], choice["variant"], choice["shapes"]) == ("dynamic", "int8_dyn", "<=128")
    assert choice["reason"].startswith("dynamic <=128: 4.00x faster on your inputs than static 128 (dense int8)")
    assert "one artifact" in choice["reason"]
    # A device with nothing static to compare against says what it picked, not "static".
    alone = json.loads((tmp_path / "metrics" / "summary.json").read_text())["shape_choice"]["openvino_cpu/host"]
    assert alone["reason"].startswith("dynamic <=128: fastest on your inputs within budget")


def test_a_pinned_artifact_is_judged_like_its_dynamic_row_and_wins_when_faster(tmp_path, tiny_bert, inputs_txt):
    """A pinned row (the dynamic artifact compiled at 16/32/64/128, inputs padded to them) sees the same tokens as
    the dynamic row: both judged against the dense fp32 at static 128; the faster one is chosen and says so."""
    bench = [_bench_dir(tmp_path, "a", _row())]
    ov = {"device": "openvino_cpu"}
    bundles = [
        _bundle_dir(tmp_path, "fp32", 82.03, _bundle_row("fp32", "static", "128", 12.0),
                    _bundle_row("fp32", "dynamic", "<=128", 4.0, metric=82.03)),
        _bundle_dir(tmp_path, "ov_dyn", 81.93, _bundle_row("ov_dyn", "pinned", "16/32/64/128", 1.5, metric=81.93, **ov),
                    _bundle_row("ov_dyn", "dynamic", "<=128", 1.9, metric=81.95, **ov)),
    ]
    params = ReportParams(accuracy_budget=0.5, seq_len_choice=_txt(inputs_txt))
    _report(bench, params, tmp_path / "metrics", inputs_txt, tiny_bert, bundle_dirs=bundles)
    table = pd.read_csv(tmp_path / "metrics" / "bundles.csv").set_index(["variant", "policy", "shapes"])
    assert table.loc[("ov_dyn", "pinned", "16/32/64/128"), "metric_drop"] == pytest.approx(0.1)
    assert table.loc[("ov_dyn", "dynamic", "<=128"), "metric_drop"] == pytest.approx(0.08)
    choice = json.loads((tmp_path / "metrics" / "summary.json").read_text())["shape_choice"]["openvino_cpu/host"]
    assert (choice["policy"], choice["shapes"]) == ("pinned", "16/32/64/128")
    assert choice["reason"].startswith("pinned 16/32/64/128: fastest on your inputs within budget")


def test_the_race_timings_rank_the_rows_when_there_is_a_race(tmp_path, tiny_bert, inputs_txt):
    """Each bundle stage timed its own rows (int8 2.0 ms, int8_b 2.5 ms, in different processes); the race timed
    them side by side (3.0 and 2.2 ms): the choice and its reason follow the race, the bundle timings stay."""
    bench = [_bench_dir(tmp_path, "a", _row())]
    bundles = [
        _bundle_dir(tmp_path, "fp32", 82.03, _bundle_row("fp32", "static", "128", 12.0)),
        _bundle_dir(tmp_path, "int8", 81.9, _bundle_row("int8", "dynamic", "<=128", 2.0, metric=81.9)),
        _bundle_dir(tmp_path, "int8_b", 81.95, _bundle_row("int8_b", "dynamic", "<=128", 2.5, metric=81.95)),
    ]
    race = tmp_path / "race"
    race.mkdir()
    key = {"model": "dense", "device": "ort_cpu", "target": "host"}
    (race / "stage.json").write_text(json.dumps({"key": "k", "files": [], "rows": [
        {**key, "variant": "fp32", "policy": "static", "shapes": "128", "race_mean_ms": 11.0, "race_p99_ms": 20.0},
        {**key, "variant": "int8", "policy": "dynamic", "shapes": "<=128", "race_mean_ms": 3.0, "race_p99_ms": 6.0},
        {**key, "variant": "int8_b", "policy": "dynamic", "shapes": "<=128", "race_mean_ms": 2.2, "race_p99_ms": 4.0}]}))
    params = ReportParams(accuracy_budget=0.5, seq_len_choice=_txt(inputs_txt))
    _report(bench, params, tmp_path / "metrics", inputs_txt, tiny_bert, bundle_dirs=bundles, race_dir=race)
    table = pd.read_csv(tmp_path / "metrics" / "bundles.csv").set_index(["variant", "policy", "shapes"])
    assert table.loc[("int8", "dynamic", "<=128"), ["latency_mix_mean_ms", "race_mean_ms"]].tolist() == [2.0, 3.0]
    choice = json.loads((tmp_path / "metrics" / "summary.json").read_text())["shape_choice"]["ort_cpu/host"]
    assert (choice["variant"], choice["latency_mix_mean_ms"], choice["timed_by"]) == ("int8_b", 2.2, "race")
    assert choice["reason"].startswith("dynamic <=128: 5.00x faster on your inputs than static 128 (dense fp32)")
    # Without a race the bundle stages' own timings rank them.
    _report(bench, params, tmp_path / "alone", inputs_txt, tiny_bert, bundle_dirs=bundles)
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())["shape_choice"]["ort_cpu/host"]
    assert (alone["variant"], alone["timed_by"]) == ("int8", "bundle")


def test_static_only_bundles_take_the_benchmark_accuracy(tmp_path, tiny_bert, inputs_txt):
    bench = [_bench_dir(tmp_path, "a", _row(seq_len=16, metric_value=60.0))]
    bundles = [_stage_only(tmp_path / "fp32", _bundle_row("fp32", "static", "16", 2.0, truncated=1))]
    params = ReportParams(accuracy_budget=0.5, seq_len_choice=_txt(inputs_txt))
    _report(bench, params, tmp_path / "metrics", inputs_txt, tiny_bert, bundle_dirs=bundles)
    (row,) = pd.read_csv(tmp_path / "metrics" / "bundles.csv").to_dict("records")
    assert (row["policy"], row["metric_value"], row["within_budget"]) == ("static", 60.0, True)
    assert row["covered_share"] == pytest.approx(199 / 200)


def _stage_only(folder, *rows):
    folder.mkdir()
    (folder / "stage.json").write_text(json.dumps({"key": "k", "files": [], "rows": list(rows), "evaluations": []}))
    return folder
