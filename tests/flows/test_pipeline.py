"""The core promise: content-keyed caching that Prefect and `dvc repro` agree on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from conftest import write_params
from typer.testing import CliRunner

from flows.cli import app
from flows.compare import compare
from flows.pipeline import pipeline
from tasks.core.schemas import COMPILE_ROWS, SENSITIVITY_ROWS
from tasks.data.evaluation import metric_label
from tasks.stages.report import REPORT_TABLE

ALL_STAGES = {
    "fetch_model",
    "calibration_data",
    "prune@dense",
    "export_onnx@dense-16",
    "export_onnx@dense-32",
    "reference@16",
    "reference@32",
    "graph_surgery@dense-16",
    "graph_surgery@dense-32",
    "quantize@dense-fp32-16",
    "quantize@dense-fp32-32",
    "quantize@dense-ort_qdq_a16w8-16",
    "quantize@dense-ort_qdq_a16w8-32",
    "compile@dense-job0-16",
    "compile@dense-job0-32",
    "benchmark@dense-target0-16",
    "benchmark@dense-target0-32",
    "bundle@dense-target0",
    "race",
    "latency_curve@dense",
    "report",
}


def executed(result: dict) -> set[str]:
    return {name for name, state in result["stages"].items() if state != "Cached"}


def dvc(*args: str) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def dvc_ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_param(ws, section: str, key: str, value) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params[section][key] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_flow_runs_everything_then_nothing_and_dvc_agrees(workspace):
    first = pipeline(project_dir=str(workspace))
    assert executed(first) == ALL_STAGES

    table = REPORT_TABLE.validate(pd.read_csv(workspace / "metrics" / "benchmark.csv"))
    assert sorted(table["seq_len"]) == [16, 32]
    assert (table["artifact"] == ["artifacts/quantize/dense/fp32-16/model.onnx", "artifacts/quantize/dense/fp32-32/model.onnx"]).all()
    assert table["within_budget"].all() and (table["metric_drop"] == 0).all()
    assert (table["cosine_to_fp32_min"] > 0.9999).all()  # fp32 is its own reference
    assert (table["latency_p50_ms"] <= table["latency_p99_ms"]).all()
    assert not table["simulated"].any() and table["npu_nodes"].isna().all()  # nothing compiled for ort_cpu
    # Two timing repeats of 50 runs (tiny_params), each in its own process; the first also measured the accuracy.
    assert (table["timing_repeats"] == 2).all() and (table["timed_runs"] == 100).all()
    assert table["latency_p50_spread_pct"].notna().all() and (table["warm_start_ms"] > 0).all()
    assert (table["target"] == "host").all() and not table["quick"].any()
    # STS-B sentences run to ~70 tokens: neither 16 nor 32 keeps 99 % whole, so the longer one is chosen.
    choice = first["seq_len_choice"]["choice"]["ort_cpu/host"]
    assert choice["seq_len"] == 32 and "measure longer lengths" in choice["reason"]
    page = first["report_files"][0]
    assert page.endswith("index.html") and "<svg" in open(page).read()
    # The fp32 target as a bundle of both lengths, and each length deployed alone, timed on the same inputs.
    bundles = pd.read_csv(workspace / "metrics" / "bundles.csv").set_index(["policy", "shapes"])
    assert sorted(bundles.index) == [("buckets", "16/32"), ("static", "16"), ("static", "32")]
    assert (bundles["latency_mix_mean_ms"] > 0).all() and (bundles["mix_inputs"] == 300).all()
    routed = bundles.loc[("buckets", "16/32")]
    assert routed["within_budget"] and routed["metric_drop"] == 0  # the dense fp32 bundle is its own baseline
    assert routed["truncated_inputs"] == bundles.loc[("static", "32"), "truncated_inputs"]  # 32 is its largest
    assert bundles.loc[("static", "16"), "truncated_inputs"] > routed["truncated_inputs"]
    assert "Latency on your inputs" in open(page).read()

    compiled = COMPILE_ROWS.validate(pd.read_csv(workspace / "metrics" / "compile.csv"))
    assert list(compiled["status"]) == ["compiled", "compiled"] and compiled["simulated"].all()
    assert (compiled["npu_nodes"] > 10).all() and (compiled["cpu_fallback_nodes"] == 0).all()
    assert (compiled["verify_min_cosine"] >= 0.999).all()  # the HTP simulator reproduces the CPU EP
    assert (workspace / compiled["artifact"].iloc[0]).is_file()

    shown = CliRunner().invoke(app, ["results", "--markdown"])
    assert shown.exit_code == 0, shown.output
    assert "| fp32 " in shown.output and "| snapdragon_8_gen_3 " in shown.output and "× ORT fp32" in shown.output
    brief = CliRunner().invoke(app, ["results", "--markdown", "--brief"]).output.splitlines()
    assert "| p50 ms @16 " in brief[0] and "| p50 ms @32 " in brief[0] and "| in budget @32 " in brief[0]
    header, _, *rows = ([cell.strip() for cell in line.strip("|").split("|")] for line in brief)
    measured = {r["seq_len"]: r for r in first["rows"]}
    metric = metric_label(measured[16]["eval_set"], measured[16]["metric_name"])
    assert [dict(zip(header, row)) for row in rows] == [
        {"model": "dense", "variant": "fp32", "device": "ort_cpu", "target": "host",
         **{f"p50 ms @{n}": f"{measured[n]['latency_p50_ms']:.2f}" for n in (16, 32)},
         "× ORT fp32 @16": "1.00", "× ORT fp32 @32": "1.00",  # dense ORT fp32 is the speed-up baseline
         **{f"{metric} @{n}": f"{measured[n]['metric_value']:.2f}" for n in (16, 32)},
         "in budget @16": "yes", "in budget @32": "yes"}]

    second = pipeline(project_dir=str(workspace))
    assert executed(second) == set()
    assert second["rows"] == first["rows"]
    # Nothing was measured again, so every metric delta between the two MLflow runs is zero.
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    diff = compare(uri, first["mlflow_run_id"], second["mlflow_run_id"])
    assert diff["params"] == [] and diff["only_in_a"] == diff["only_in_b"] == []
    assert len(diff["changes"]) == 2 * 6 and {c["verdict"] for c in diff["changes"]} == {"same"}
    compared = CliRunner().invoke(app, ["compare", first["mlflow_run_id"], second["mlflow_run_id"]])
    assert compared.exit_code == 0 and "only in" not in compared.output, compared.output
    assert "settings: the same" in compared.output and "the same for every artifact" in compared.output
    rebuilt = CliRunner().invoke(app, ["report", "--name", "again"])
    assert rebuilt.exit_code == 0 and (workspace / "reports" / "again" / "index.html").is_file(), rebuilt.output

    # (d) the flow recorded its outputs in dvc.lock: dvc sees nothing to do.
    assert "up to date" in dvc("status")

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    parent = client.get_run(second["mlflow_run_id"])
    assert parent.data.tags["version.onnxruntime"] and parent.data.tags["stages.ran"] == "0"
    assert "fp32" in parent.data.tags["mlflow.note.content"] and parent.data.tags["registered.ort_cpu/16"]
    logged = {a.path for folder in (None, "report") for a in client.list_artifacts(parent.info.run_id, folder)}
    assert {"stages.json", "config.json", "params.yaml", "benchmark.csv", "summary.json", "report/index.html"} <= logged
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert parent.info.run_name.startswith("bert · 2 variants · 2 devices · ")
    assert parent.data.params["variants"] == "fp32, ort_qdq_a16w8" and "metric/dense/fp32/ort_cpu/host/16" in parent.data.metrics
    benchmarks = [c for c in children if c.data.tags["kind"] == "benchmark"]
    assert {c.info.run_name for c in benchmarks} == {"dense/fp32/ort_cpu/16", "dense/fp32/ort_cpu/32"}
    assert all(c.data.params["artifact_sha256"] and "metric_value" in c.data.metrics for c in benchmarks)
    compiles = {c.info.run_name: c for c in children if c.data.tags["kind"] == "compile"}
    assert set(compiles) == {f"compile dense/ort_qdq_a16w8/qnn_htp@snapdragon_8_gen_3/{n}" for n in (16, 32)}
    assert all(c.data.tags["simulated"] == "True" and c.data.metrics["npu_nodes"] > 10 for c in compiles.values())
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow  # a minute or more: the tiny DAG several times, or servers
def test_a_no_op_rerun_reads_no_artifact_and_leaves_dvc_lock_alone(workspace, tiny_bert, monkeypatch):
    """What keeps a no-op run of the full job fast: stage keys come from the stat memo (no artifact is read
    to hash it) and DVC's commit is skipped while nothing dvc.lock records changed; a hand-edited dvc.lock
    is recorded again."""
    from dvc.repo import Repo

    import flows.stages

    pipeline(project_dir=str(workspace))
    # As if written in an earlier session: files younger than 2 s are never taken from the memo.
    past = time.time() - 60
    for path in [*workspace.rglob("*"), *tiny_bert.rglob("*")]:
        if path.is_file() and ".dvc" not in path.parts and ".git" not in path.parts:
            os.utime(path, (past, past))
    assert executed(pipeline(project_dir=str(workspace))) == set()  # verified by content, memo filled

    hashed, commits = [], []
    real_key, real_commit = flows.stages.stage_key, Repo.commit
    monkeypatch.setattr(flows.stages, "stage_key", lambda **kw: hashed.append(kw["extra"]["stage"]) or real_key(**kw))
    monkeypatch.setattr(Repo, "commit", lambda self, *a, **kw: commits.append(1) or real_commit(self, *a, **kw))
    third = pipeline(project_dir=str(workspace))
    assert executed(third) == set() and third["dvc_synced"]
    assert hashed == [] and commits == []
    assert "up to date" in dvc("status")

    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    del lock["stages"]["report"]
    (workspace / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    assert "report" in dvc("status")
    assert executed(pipeline(project_dir=str(workspace))) == set() and commits == [1]
    assert "up to date" in dvc("status")


@pytest.mark.slow  # a minute or more: the tiny DAG several times, or servers
def test_sensitivity_and_auto_mixed_run_in_the_flow_and_under_dvc(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["seq_lens"] = [16]
    params["sensitivity"].update(variants=["ort_qdq_a16w8"], probes=["kept"], items=20, calibration_rows=8, threads=1)
    # The tiny random BERT's metric is noise: a wide budget keeps the choice stable (its search: test_sensitivity.py).
    params["quantize"]["variants"]["mixed"] = {"method": "auto_mixed", "base": "ort_qdq_a16w8", "budget": 50.0}
    params["variants"].append("mixed")
    params["targets"].append({"variant": "mixed", "device": "ort_cpu"})
    write_params(workspace, params)
    probed, mixed = "sensitivity@dense-ort_qdq_a16w8", "quantize@dense-mixed-16"
    first = pipeline(project_dir=str(workspace))
    assert {probed, mixed} <= executed(first)
    order = list(first["stages"])
    assert order.index("quantize@dense-ort_qdq_a16w8-16") < order.index(probed) < order.index(mixed)
    table = SENSITIVITY_ROWS.validate(pd.read_csv(workspace / "metrics" / "sensitivity.csv"))
    # The full variant, then each of the tiny BERT's 8 layer groups kept float alone, on 20 STS-B pairs.
    assert list(table["probe"]) == ["all"] + ["kept"] * 8 and (table["eval_items"] == 20).all()
    (chosen,) = json.loads((workspace / "metrics" / "auto_mixed.json").read_text())
    assert chosen["variant"] == "mixed" and chosen["within_budget"] and chosen["eval_items"] == 40  # max_items
    assert {r["variant"] for r in first["rows"]} == {"fp32", "mixed"}
    page = open(first["report_files"][0]).read()
    # Plots: Pareto, sequence length, sensitivity, latency on your inputs (bundles).
    assert "Per-layer sensitivity" in page and "Mixed precision chosen" in page and page.count("<svg") == 4
    assert "up to date" in dvc("status")

    set_param(workspace, "sensitivity", "items", 24)
    assert executed(pipeline(project_dir=str(workspace))) == {probed, mixed, "report"}
    set_param(workspace, "sensitivity", "items", 28)  # a new value: DVC's run cache would restore an old one
    # DVC lists the assignment for every quantize instance (it cannot pick per variant), and a rerun quantize
    # folder (a new stage.json) reruns what reads it: more than the flow, never less, and nothing upstream.
    quantized = {"quantize@dense-fp32-16", "quantize@dense-ort_qdq_a16w8-16", mixed}
    ran = dvc_ran(dvc("repro"))
    assert {probed, *quantized, "report"} <= ran
    assert not ran & {"fetch_model", "calibration_data", "prune@dense", "export_onnx@dense-16", "graph_surgery@dense-16",
                      "reference@16"}


def test_export_param_change_reruns_export_and_downstream_only(workspace):
    pipeline(project_dir=str(workspace))
    set_param(workspace, "export_onnx", "opset", 18)
    result = pipeline(project_dir=str(workspace))
    assert executed(result) == ALL_STAGES - {"fetch_model", "calibration_data", "prune@dense"}


@pytest.mark.slow  # a minute or more: the tiny DAG several times, or servers
def test_dvc_repro_reruns_export_and_downstream_only_and_flow_then_skips_all(workspace):
    # One length: every `dvc repro` stage is a fresh `edgeopt stage` process (seconds of imports each).
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["seq_lens"] = [16]
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    all_16 = {name for name in ALL_STAGES if not name.endswith("32")}

    first = dvc("repro")
    assert dvc_ran(first) == all_16
    assert dvc_ran(dvc("repro")) == set()

    set_param(workspace, "export_onnx", "opset", 18)
    assert dvc_ran(dvc("repro")) == all_16 - {"fetch_model", "calibration_data", "prune@dense"}

    # The DVC runner left Prefect cache records: the flow redoes none of dvc's work.
    assert executed(pipeline(project_dir=str(workspace))) == set()


@pytest.mark.slow  # a minute or more: the tiny DAG several times, or servers
def test_quantize_param_change_reruns_that_variant_and_downstream_only(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["variants"].append("ort_dynamic_int8")
    params["targets"].append({"variant": "ort_dynamic_int8", "device": "ort_cpu"})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = pipeline(project_dir=str(workspace))
    dynamic = {r["seq_len"]: r for r in first["rows"] if r["variant"] == "ort_dynamic_int8"}
    assert all(r["precision"].startswith("int8 dynamic") and r["cosine_to_fp32_min"] > 0.9 for r in dynamic.values())

    params["quantize"]["variants"]["ort_dynamic_int8"]["per_channel"] = True
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    downstream = {"quantize@dense-ort_dynamic_int8-16", "quantize@dense-ort_dynamic_int8-32",
                  "benchmark@dense-target1-16", "benchmark@dense-target1-32", "bundle@dense-target1",
                  "race", "latency_curve@dense", "report"}
    assert executed(pipeline(project_dir=str(workspace))) == downstream

    params["quantize"]["variants"]["ort_dynamic_int8"]["per_channel"] = False
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # A bundle's DVC deps name its model's quantize folder (DVC cannot list one variant's lengths per instance):
    # DVC also reruns the model's other bundles (more than the flow, never less).
    assert dvc_ran(dvc("repro")) == downstream | {"bundle@dense-target0"}


def test_missing_output_means_rerun_and_export_is_deterministic(workspace):
    pipeline(project_dir=str(workspace))
    onnx_before = (workspace / "artifacts/export_onnx/dense/seq16/model.onnx").read_bytes()
    shutil.rmtree(workspace / "artifacts/export_onnx/dense/seq16")

    result = pipeline(project_dir=str(workspace))
    # Only the deleted stage reruns: its new model is byte-identical, so nothing downstream changes.
    assert executed(result) == {"export_onnx@dense-16"}
    assert (workspace / "artifacts/export_onnx/dense/seq16/model.onnx").read_bytes() == onnx_before


def test_code_change_reruns_that_stage(workspace):
    pipeline(project_dir=str(workspace))
    report_py = workspace / "tasks" / "stages" / "report.py"
    report_py.write_text(report_py.read_text() + "\n# a harmless edit\n")
    assert executed(pipeline(project_dir=str(workspace))) == {"report"}


def test_editing_a_function_a_stage_reaches_transitively_reruns_it(workspace):
    """The reference stage runs build_feeds only through the ORT CPU backend (tasks/core/feeds.py): its code
    key is its import closure, so editing that function reruns it, in Prefect and in `dvc status` alike."""
    pipeline(project_dir=str(workspace))
    feeds = workspace / "tasks" / "core" / "feeds.py"
    text = feeds.read_text()
    anchor = "    specs, meta = input_specs(model_inputs)\n"
    assert anchor in text
    feeds.write_text(text.replace(anchor, anchor + "    assert specs is not None  # an edit inside build_feeds\n"))
    changed = dvc("status")
    assert "reference@16" in changed and "reference@32" in changed and "export_onnx@dense-16" not in changed
    rerun = executed(pipeline(project_dir=str(workspace)))
    assert {"reference@16", "reference@32", "graph_surgery@dense-16", "benchmark@dense-target0-16"} <= rerun
    # What does not reach build_feeds stays cached.
    assert not rerun & {"fetch_model", "calibration_data", "prune@dense", "export_onnx@dense-16", "export_onnx@dense-32"}


@pytest.mark.parametrize("stale", ["stamp", "half-written"])
def test_stale_or_partial_output_is_never_a_hit(workspace, stale):
    pipeline(project_dir=str(workspace))
    out = workspace / "artifacts/benchmark/dense/fp32-ort_cpu-32"
    if stale == "stamp":
        (out / "stage.json").write_text('{"key": "not-this-one", "files": []}')
    else:
        (out / "outputs-host.npy").unlink()
    # The benchmark reruns; its fresh latencies change the report's input, so the report reruns too.
    assert executed(pipeline(project_dir=str(workspace))) == {"benchmark@dense-target0-32", "report"}


def test_unreachable_mlflow_server_falls_back_to_local_store(workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    result = pipeline(project_dir=str(workspace))
    assert "unreachable" in result["mlflow_fallback_reason"]
    assert result["mlflow_tracking_uri"].startswith("sqlite:///")
    client = MlflowClient(tracking_uri=result["mlflow_tracking_uri"])
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"


def test_a_failing_dvc_sync_does_not_lose_the_mlflow_run(workspace, monkeypatch):
    """MLflow logging comes before the DVC sync and does not depend on it: the run is in MLflow, finished, with
    its metrics, although the flow then fails on the sync."""
    from flows import dvc_yaml
    from tasks.core.errors import StageError

    def broken_sync(*_args, **_kwargs):
        raise StageError("dvc commit: simulated failure")

    monkeypatch.setattr(dvc_yaml, "sync_lock", broken_sync)
    state = pipeline(project_dir=str(workspace), return_state=True)
    assert state.is_failed() and "simulated failure" in state.message
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.mlflow.parentRunId IS NULL")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.metrics


def test_second_run_waits_for_the_first(workspace):
    import threading
    import time

    from flows.locking import workspace_lock

    messages: list[str] = []
    order: list[str] = []

    def second():
        with workspace_lock(workspace, on_wait=messages.append, poll_s=0.05):
            order.append("second")

    with workspace_lock(workspace):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second"]
    assert messages and "held by pid" in messages[0]


@pytest.mark.slow  # a minute or more: the tiny DAG several times, or servers
def test_dynamic_shape_variants_run_in_the_flow_under_dvc_and_against_peer_exports(workspace):
    """`shape: dynamic` variants go through export, surgery, quantize, benchmark and a dynamic bundle in the flow,
    DVC agrees, the report compares them with the static and bucketed rows, and `edgeopt peers` times the run's
    choice against exports handed to it as peers (here: copies of the run's own artifacts, so they must score the
    same)."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["export_onnx"]["dynamic"] = True
    params["quantize"]["variants"]["fp32_dynshape"] = {"method": "none", "shape": "dynamic"}
    params["quantize"]["variants"]["a8w8_dynshape"] = {**params["quantize"]["variants"]["ort_qdq_a8w8"], "shape": "dynamic"}
    params["variants"] += ["fp32_dynshape", "a8w8_dynshape"]
    params["targets"] += [{"variant": "fp32_dynshape", "device": "ort_cpu"}, {"variant": "a8w8_dynshape", "device": "ort_cpu"}]
    params["compile"]["jobs"] = [{"variant": "fp32", "device": "openvino_cpu", "target": "host"}]
    params["variants"].remove("ort_qdq_a16w8")
    # The tiny BERT's metric is noise and its vocabulary makes most STS-B train inputs > 32 tokens: a wide budget
    # and a low coverage keep a choice.
    params["report"].update(accuracy_budget=50.0, seq_len_choice={**params["report"]["seq_len_choice"], "coverage": 0.3})
    write_params(workspace, params)
    first = pipeline(project_dir=str(workspace))
    assert {"quantize@dense-a8w8_dynshape-16", "quantize@dense-a8w8_dynshape-32", "bundle@dense-target2"} <= executed(first)
    assert "up to date" in dvc("status")
    bundles = pd.read_csv(workspace / "metrics" / "bundles.csv").set_index(["variant", "policy", "shapes"])
    dynamic = bundles.loc[("fp32_dynshape", "dynamic", "<=32")]
    assert dynamic["metric_drop"] == pytest.approx(0, abs=1e-9) and dynamic["within_budget"]  # same tokens as fp32
    assert ("a8w8_dynshape", "dynamic", "<=32") in bundles.index and ("fp32", "buckets", "16/32") in bundles.index
    summary = json.loads((workspace / "metrics" / "summary.json").read_text())
    assert summary["shape_choice"]["ort_cpu/host"]["policy"] in ("static", "buckets", "dynamic")

    peers = workspace / "peers"
    for name, variant, precision in (("same_fp32", "fp32_dynshape", "fp32"), ("same_int8", "a8w8_dynshape", "int8")):
        (peers / name).mkdir(parents=True)
        shutil.copy(workspace / f"artifacts/quantize/dense/{variant}-32/model.onnx", peers / name / "model.onnx")
        (peers / name / "peer.json").write_text(json.dumps({
            "name": name, "tool": {"name": "test", "version": "0"}, "engine": "onnxruntime", "model_file": "model.onnx",
            "precision": precision, "pooling": {"in_graph": True}}))
    result = CliRunner().invoke(app, ["peers", "--peers", str(peers), "--rounds", "1", "--out", "reports/peers"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(workspace / "reports/peers/peers.csv").set_index("artifact")
    assert set(table["kind"]) == {"edgeopt", "peer"} and len(table) == 3 and (table["latency_mean_ms"] > 0).all()
    fp32_peer = table.loc["same_fp32 (test 0)"]
    # The dynamic fp32 export run unpadded scores what the dense fp32 benchmark row scores (padding is masked out).
    bench = pd.read_csv(workspace / "metrics" / "benchmark.csv")
    static = bench[(bench["variant"] == "fp32") & (bench["seq_len"] == 32)]["metric_value"].iloc[0]
    assert fp32_peer["stsb_spearman"] == pytest.approx(static, abs=1e-4)  # benchmark.csv keeps 4 decimals
    assert table["fastest_int8_peer"].iloc[0] == "same_int8 (test 0)"
    assert (workspace / "reports/peers/peers.md").read_text().startswith("Measured on ")
    assert (workspace / "reports/peers/peers.svg").read_text().lstrip().startswith("<?xml")
