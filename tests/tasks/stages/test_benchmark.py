"""Stage benchmark on tiny models: timing repeats in fresh processes, start-up, accuracy, quick mode,
compiled artifacts, and simulated targets whose accuracy comes from the CPU EP."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SENTENCE_ENCODER, STSB_TEST

from tasks.backends.qnn_htp import QnnHtpCompileParams
from tasks.core.schemas import BENCHMARK_ROWS
from tasks.data.evaluation import SentencePairsSet
from tasks.data.evaluation import EvaluationParams
from tasks.stages.benchmark import BenchmarkParams
from tasks.stages.benchmark import run as benchmark_run
from tasks.stages.compile import CompileCheckParams
from tasks.stages.compile import run as compile_run
from tasks.stages.reference import ReferenceParams
from tasks.stages.reference import run as reference_run

STSB = SentencePairsSet(name="stsb", reader="stsb", path=STSB_TEST, max_items=20)
_spec = importlib.util.spec_from_file_location("qnn_models", Path(__file__).parents[1] / "backends" / "test_qnn_htp.py")
qnn_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qnn_models)


@pytest.fixture(scope="module")
def reference16(tiny_onnx, tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    reference_run(model=tiny_onnx, model_dir=tiny_bert, evaluation_params=EvaluationParams(sets=[STSB]), seq_len=16, params=ReferenceParams(samples=40),
                  family=SENTENCE_ENCODER, out_dir=out, key="r")
    return out / "outputs.npy"


def _bench(artifact, tiny_bert, reference, out, params, device="ort_cpu", variant="fp32", compiled=None, sets=(STSB,)):
    return benchmark_run(artifact=artifact, model_dir=tiny_bert, reference_outputs=reference, source_model="tiny",
                         model="dense", variant=variant, device=device, seq_len=16, stage_name="benchmark@test",
                         params=params, evaluation_params=EvaluationParams(sets=list(sets)), family=SENTENCE_ENCODER,
                         out_dir=out, key="k", compiled=compiled)


def test_repeats_start_times_accuracy_and_quick_mode(tiny_onnx, tiny_bert, reference16, tmp_path):
    params = BenchmarkParams(threads=1, warmup_runs=2, timed_runs=50, repeats=2)
    payload = _bench(tiny_onnx, tiny_bert, reference16, tmp_path / "full", params)
    (row,) = payload["rows"]
    BENCHMARK_ROWS.validate(pd.DataFrame([row], columns=list(BENCHMARK_ROWS.columns)))
    assert (row["timed_runs"], row["timing_repeats"], row["eval_items"]) == (100, 2, 20)
    assert (row["eval_set"], row["metric_name"]) == ("stsb", "spearman") and row["stsb_spearman"] == row["metric_value"]
    assert [e["eval_set"] for e in payload["evaluations"]] == ["stsb"]
    assert row["latency_p50_spread_pct"] >= 0 and row["warm_start_ms"] > 0 and row["cold_start_ms"] > 0
    assert row["latency_p50_ms"] <= row["latency_p99_ms"] and row["throughput_per_s"] > 0
    assert row["cosine_to_fp32_min"] > 0.9999  # the fp32 export is its own reference
    assert (row["target"], row["accuracy_source"], row["simulated"], row["quick"]) == ("host", "artifact", False, False)
    assert "onnxruntime " in row["tool_versions"] and row["cpu_model"] and row["peak_rss_mb"] > 0
    assert (tmp_path / "full" / "outputs-host.npy").is_file()

    quick = params.model_copy(update={"quick": True})
    (fast,) = _bench(tiny_onnx, tiny_bert, reference16, tmp_path / "quick", quick)["rows"]
    assert fast["quick"] and fast["timed_runs"] == 2 * quick.quick_timed_runs and fast["eval_items"] == 20
    # Same artifact and inputs: the accuracy does not depend on how often it was timed.
    assert fast["metric_value"] == pytest.approx(row["metric_value"], abs=1e-6)


def test_every_evaluation_set_is_scored_and_the_first_is_the_headline(tiny_onnx, tiny_bert, reference16, tmp_path):
    """A user's own pairs CSV beside STS-B: each set gets its own metric; the row carries the first one's."""
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"a": ["a man is playing a guitar", "a dog runs", "two women are eating"],
                  "b": ["a man plays the guitar", "the cat sleeps", "a child is riding a bike"],
                  "gold": [4.8, 0.5, 0.2]}).to_csv(pairs, index=False)
    mine = SentencePairsSet(name="mine", path=pairs, reader="csv", sentence1="a", sentence2="b", score="gold")
    params = BenchmarkParams(threads=1, warmup_runs=2, timed_runs=50, repeats=2)
    payload = _bench(tiny_onnx, tiny_bert, reference16, tmp_path / "b", params, sets=(STSB, mine))
    (row,) = payload["rows"]
    assert row["eval_set"] == "stsb" and row["eval_items"] == 20
    scores = {e["eval_set"]: e for e in payload["evaluations"]}
    assert set(scores) == {"stsb", "mine"} and scores["mine"]["items"] == 3 and scores["mine"]["metric_name"] == "spearman"
    assert -100 <= scores["mine"]["metric_value"] <= 100


def test_skipped_compile_jobs_give_no_row(tiny_onnx, tiny_bert, reference16, tmp_path):
    skipped = tmp_path / "compile-npu"
    skipped.mkdir()
    (skipped / "stage.json").write_text(json.dumps({"key": "c", "files": [], "status": "skipped: no NPU"}))
    payload = _bench(tiny_onnx, tiny_bert, reference16, tmp_path / "b", BenchmarkParams(threads=1),
                     device="openvino_npu", compiled={"intel_core_ultra": skipped})
    assert payload == {"rows": [], "evaluations": [],
                       "skipped": [{"target": "intel_core_ultra", "status": "skipped: no NPU"}]}


def test_simulated_target_takes_accuracy_from_the_cpu_ep_and_checks_the_context(tiny_bert, reference16, tmp_path):
    from tasks.backends.qnn_htp import BACKEND

    if BACKEND.unavailable_reason():
        pytest.skip(f"qnn_htp unavailable: {BACKEND.unavailable_reason()}")
    qdq = qnn_models.make_tiny_qdq(tiny_bert, tmp_path / "qdq")
    compile_run(qdq, "qnn_htp", "snapdragon_8_gen_3", CompileCheckParams(threads=1, verify_min_cosine=0.5),
                QnnHtpCompileParams(), SENTENCE_ENCODER, tmp_path / "ctx", key="c", model_dir=tiny_bert,
                record={"model": "dense", "variant": "a16w8", "seq_len": 16})
    params = BenchmarkParams(threads=1, simulator_items=3, simulator_timed_runs=2)
    (row,) = _bench(qdq, tiny_bert, reference16, tmp_path / "b", params, device="qnn_htp", variant="a16w8",
                    compiled={"snapdragon_8_gen_3": tmp_path / "ctx"})["rows"]
    BENCHMARK_ROWS.validate(pd.DataFrame([row], columns=list(BENCHMARK_ROWS.columns)))
    assert row["simulated"] is BACKEND.simulated and row["target"] == "snapdragon_8_gen_3"
    assert row["artifact"].endswith("ctx/model_ctx.onnx") and row["timed_runs"] == 2 and row["timing_repeats"] == 1
    assert (row["accuracy_source"], row["eval_items"], row["sim_items"]) == ("cpu_ep_same_graph", 20, 3)
    # The simulator embedded the first pairs' sentences: row i agrees with the CPU EP's row i, and
    # clearly better than with other sentences (a shifted subset would not).
    sim = np.load(tmp_path / "b" / "outputs-snapdragon_8_gen_3-simulator.npy")
    cpu = np.load(tmp_path / "b" / "outputs-cpu_ep.npy")
    assert len(sim) == 6 and len(cpu) > len(sim)
    cos = (sim @ cpu[: len(sim)].T) / np.outer(np.linalg.norm(sim, axis=1), np.linalg.norm(cpu[: len(sim)], axis=1))
    assert row["sim_cosine_to_cpu_ep_mean"] == pytest.approx(float(np.diag(cos).mean()), abs=1e-5)
    assert np.diag(cos).mean() > cos[~np.eye(len(sim), dtype=bool)].mean()
