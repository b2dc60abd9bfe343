"""`edgeopt speedup`: ratios from interleaved timing of a run's benchmarked artifacts."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from helpers import quantize_variant
from typer.testing import CliRunner

from flows.cli import app
from tasks.backends.interleave import speedups
from tasks.recipes.ort_dynamic import OrtDynamicSettings

runner = CliRunner()


def test_speedups_are_ratios_within_each_round():
    rows = [{"round": 1, "arm": "a", "latency_p50_ms": 10.0}, {"round": 1, "arm": "b", "latency_p50_ms": 5.0},
            {"round": 2, "arm": "b", "latency_p50_ms": 8.0}, {"round": 2, "arm": "a", "latency_p50_ms": 20.0},
            {"round": 3, "arm": "a", "latency_p50_ms": 12.0}, {"round": 3, "arm": "b", "latency_p50_ms": 4.0}]
    summary = {s["arm"]: s for s in speedups(rows, "a")}
    assert summary["a"]["speedup_median"] == 1.0
    # Per round 2.0, 2.5, 3.0: the median of the ratios, not the ratio of the medians (12 / 5 = 2.4).
    assert summary["b"]["speedup_median"] == 2.5
    assert (summary["b"]["speedup_min"], summary["b"]["speedup_max"]) == (2.0, 3.0)
    assert summary["b"]["latency_p50_ms_median"] == 5.0 and summary["b"]["rounds"] == 3
    with pytest.raises(ValueError, match="baseline 'c'"):
        speedups(rows, "c")


@pytest.fixture
def benchmarked(workspace, tiny_onnx, calib, tmp_path):
    """A workspace whose metrics/benchmark.csv names the tiny fp32 export and its dynamic int8 at length 16."""
    int8, _ = quantize_variant(tmp_path, tiny_onnx, None, "ort_dynamic_int8", OrtDynamicSettings())
    (workspace / "artifacts" / "calibration_data").mkdir(parents=True)
    shutil.copy(calib, workspace / "artifacts" / "calibration_data" / "calib_seq16.npz")
    (workspace / "metrics").mkdir()
    common = {"model": "dense", "device": "ort_cpu", "target": "host", "seq_len": 16, "simulated": False}
    pd.DataFrame([
        {**common, "variant": "fp32", "artifact": str(tiny_onnx)},
        {**common, "variant": "ort_dynamic_int8", "artifact": str(int8 / "model.onnx")},
        {**common, "variant": "ort_qdq_a16w8", "device": "qnn_htp", "target": "snapdragon_8_gen_3",
         "artifact": str(tiny_onnx), "simulated": True},
    ]).to_csv(workspace / "metrics" / "benchmark.csv", index=False)
    return workspace


def test_speedup_times_artifacts_in_alternating_rounds(benchmarked):
    result = runner.invoke(app, ["speedup", "dense/fp32", "dense/ort_dynamic_int8", "--seq-len", "16",
                                 "--rounds", "3", "--csv", "rounds.csv"])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(benchmarked / "rounds.csv")
    # Every round times both, each in its own worker; the order reverses every round.
    assert list(rows["round"]) == [1, 1, 2, 2, 3, 3]
    fp32, int8 = "dense/fp32@ort_cpu", "dense/ort_dynamic_int8@ort_cpu"
    assert list(rows["arm"]) == [fp32, int8, int8, fp32, fp32, int8]
    assert (rows["timed_runs"] == 50).all() and (rows["threads"] == 1).all()  # the workspace's benchmark params
    assert (rows["latency_p50_ms"] > 0).all() and (rows["latency_p50_ms"] <= rows["latency_p90_ms"]).all()
    assert rows["cpu_model"].notna().all()
    assert "1.00x" in result.output and "CPU: " in result.output
    assert not (benchmarked / "rounds.csv.tmp").exists()


@pytest.mark.parametrize(("arms", "message"), [
    (["dense/fp32", "dense/ort_qdq_a8w8"], "dense/ort_qdq_a8w8: no benchmark row for it at --seq-len 16; the run has"),
    (["dense/fp32", "dense/ort_qdq_a16w8@qnn_htp/snapdragon_8_gen_3"], "runs on a simulator"),
    (["dense/fp32", "dense"], "name an artifact as MODEL/VARIANT"),
    (["dense/fp32"], "name at least two artifacts"),
])
def test_speedup_bad_arms_are_one_line(benchmarked, arms, message):
    result = runner.invoke(app, ["speedup", *arms, "--seq-len", "16"])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_speedup_help_renders():
    result = runner.invoke(app, ["speedup", "--help"])
    assert result.exit_code == 0 and "MODEL/VARIANT@DEVICE/TARGET" in result.output
