"""STS-B as distributed, and the benchmark.csv results contract."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.errors import InputError, StageError
from tasks.report import ReportParams, collect_rows, run as report_run
from tasks.stsb import read_pairs

from conftest import STSB_DIR


def test_reads_all_test_pairs_despite_quotes_crlf_and_extra_fields():
    pairs = read_pairs(STSB_DIR / "sts-test.csv")
    assert len(pairs) == 1379
    assert pairs["score"].between(0, 5).all()
    assert not pairs["sentence2"].str.endswith("\r").any()
    assert len(read_pairs(STSB_DIR / "sts-train.csv")) == 5749


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no sentence pairs"),
        (b"a\tb\tc\n", "expected 7 tab-separated fields"),
        (b"g\ts\t2012\t1\tfive\tA.\tB.\n", "score"),
        (b"g\ts\t2012\t1\t9.0\tA.\tB.\n", "score"),
        (b"g\ts\t2012\t1\t1.0\t\xff\xfe\tB.\n", "not UTF-8"),
    ],
)
def test_bad_stsb_files(tmp_path, content, message):
    path = tmp_path / "sts-test.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as err:
        read_pairs(path)
    assert str(path) in str(err.value)


def _row(**overrides):
    row = {
        "model": "dense", "source_model": "m", "variant": "fp32", "device": "ort_cpu", "seq_len": 128,
        "artifact": "artifacts/quantize/dense/fp32-128/model.onnx", "artifact_sha256": "0" * 64, "size_mb": 90.3,
        "latency_p50_ms": 20.0, "latency_p90_ms": 22.0, "latency_p99_ms": 25.0, "latency_mean_ms": 20.5,
        "latency_std_ms": 1.0, "timed_runs": 100, "cold_start_ms": 400.0, "threads": 2, "precision": "fp32",
        "stsb_pairs": 1379, "stsb_spearman": 82.03, "cosine_to_fp32_mean": 1.0, "cosine_to_fp32_min": 1.0,
        "engine_version": "1.31.1", "dvc_stage": "benchmark@dense-target0-128",
    }
    return {**row, **overrides}


def _bench_dir(tmp_path, name, row):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "stage.json").write_text(json.dumps({"key": "k", "files": [], "row": row}))
    return folder


def test_report_writes_validated_csv_and_summary(tmp_path):
    dirs = [
        _bench_dir(tmp_path, "a", _row()),
        _bench_dir(tmp_path, "b", _row(seq_len=512)),
        _bench_dir(tmp_path, "c", _row(variant="int8_ok", stsb_spearman=81.6, latency_p50_ms=8.0)),
        _bench_dir(tmp_path, "d", _row(variant="int8_bad", stsb_spearman=38.6, latency_p50_ms=5.0)),
    ]
    report_run(dirs, ReportParams(accuracy_budget=0.5), tmp_path / "metrics", key="k")
    table = pd.read_csv(tmp_path / "metrics" / "benchmark.csv").set_index("variant")
    assert table.loc["int8_ok", "within_budget"] and not table.loc["int8_bad", "within_budget"]
    assert table.loc["int8_bad", "spearman_drop"] == pytest.approx(82.03 - 38.6)
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert summary["dense/fp32/ort_cpu/512"]["stsb_spearman"] == pytest.approx(82.03)
    # The faster but broken variant is never the winner.
    assert summary["best_within_budget"]["ort_cpu/128"]["variant"] == "int8_ok"
    assert summary["best_within_budget"]["ort_cpu/512"]["variant"] == "fp32"


def test_pruned_rows_are_judged_against_dense_and_their_own_fp32(tmp_path):
    dirs = [
        _bench_dir(tmp_path, "a", _row()),
        _bench_dir(tmp_path, "b", _row(model="pruned", stsb_spearman=81.0, latency_p50_ms=12.0)),
        _bench_dir(tmp_path, "c", _row(model="pruned", variant="int8", stsb_spearman=80.8, latency_p50_ms=6.0)),
    ]
    report_run(dirs, ReportParams(accuracy_budget=1.5), tmp_path / "metrics", key="k")
    table = pd.read_csv(tmp_path / "metrics" / "benchmark.csv").set_index(["model", "variant"])
    assert table.loc[("pruned", "int8"), "spearman_drop"] == pytest.approx(82.03 - 80.8)
    assert table.loc[("pruned", "int8"), "drop_vs_own_fp32"] == pytest.approx(81.0 - 80.8)
    assert table.loc[("dense", "fp32"), "drop_vs_own_fp32"] == 0
    best = json.loads((tmp_path / "metrics" / "summary.json").read_text())["best_within_budget"]["ort_cpu/128"]
    assert (best["model"], best["variant"]) == ("pruned", "int8")


def test_budget_needs_an_fp32_row(tmp_path):
    with pytest.raises(StageError, match=r"no fp32 row for \['dense@128'\]"):
        report_run([_bench_dir(tmp_path, "a", _row(variant="int8"))], ReportParams(), tmp_path / "m", key="k")


@pytest.mark.parametrize(
    "bad",
    [_row(latency_p50_ms=-1.0), _row(timed_runs=10), _row(artifact_sha256="abc")],
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
