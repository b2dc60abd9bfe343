"""The HTML/Markdown report: built from a report stage's metrics, self-contained, and it renders.

The metrics come from the real report stage run on hand-made benchmark, compile and latency-curve
outputs (a real run takes minutes; tests/test_pipeline.py covers the flow writing the report).
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from chromium import chromium, render
from conftest import SENTENCE_ENCODER

from flows import dashboard
from tasks.data.text import TextSource
from tasks.stages.report import ReportParams
from tasks.stages.report import run as report_run

BASE = {
    "model": "dense", "source_model": "m", "artifact_sha256": "0" * 64, "size_mb": 90.3, "timed_runs": 300,
    "cold_start_ms": 400.0, "threads": 2, "precision": "fp32", "eval_set": "stsb", "metric_name": "spearman",
    "higher_is_better": True, "eval_items": 1379, "eval_total_items": 1379, "cosine_to_fp32_mean": 0.999,
    "cosine_to_fp32_min": 0.99, "engine_version": "1.31.1", "target": "host", "simulated": False, "quick": False,
    "timing_repeats": 3, "latency_p50_spread_pct": 1.2, "latency_stable": True, "warm_start_ms": 300.0,
    "peak_rss_mb": 250.0, "accuracy_source": "artifact", "sim_items": None, "sim_metric_value": None,
    "sim_cosine_to_cpu_ep_mean": None, "sim_cosine_to_cpu_ep_min": None, "cpu_model": "AMD EPYC",
    "cpu_flags": "avx2 fma", "tool_versions": "numpy 2.3.1; onnxruntime 1.31.1",
}


def _row(variant, device, seq_len, p50, spearman, **extra):
    return {**BASE, "variant": variant, "device": device, "seq_len": seq_len, "latency_p50_ms": p50,
            "latency_p90_ms": p50 * 1.05, "latency_p99_ms": p50 * 1.2, "latency_mean_ms": p50 * 1.02,
            "latency_std_ms": p50 * 0.05, "throughput_per_s": 1000 / p50, "metric_value": spearman, "stsb_spearman": spearman,
            "artifact": f"artifacts/quantize/dense/{variant}-{seq_len}/model.onnx",
            "dvc_stage": f"benchmark@dense-{variant}-{seq_len}", **extra}


def _stage(folder, **payload):
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text(json.dumps({"key": "k", "files": [], **payload}))
    return folder


def _bench(folder, *rows):
    """A benchmark output: its rows and their evaluation set's score (what the stage writes)."""
    keys = ("model", "variant", "device", "target", "seq_len")
    scores = [{**{k: r[k] for k in keys}, "eval_set": "stsb", "metric_name": "spearman",
               "metric_value": r["metric_value"], "higher_is_better": True, "items": 1379, "total_items": 1379,
               "accuracy_source": r["accuracy_source"]} for r in rows]
    return _stage(folder, rows=list(rows), evaluations=scores)


def _compile(folder, variant, device, target, seq_len, status="compiled", fallback=None):
    done = status == "compiled"
    return _stage(
        folder, model="dense", variant=variant, device=device, target=target, seq_len=seq_len, status=status,
        artifact="model_ctx.onnx" if done else None, size_mb=23.0 if done else None,
        npu_nodes=754 if done else None, cpu_fallback_nodes=len(fallback or {}) if done else None,
        cpu_fallback_op_types=fallback or {} if done else None, compile_seconds=40.0 if done else None,
        verify_min_cosine=0.9991 if done else None, verify_run_ms_median=2400.0 if done else None,
        simulated=device == "qnn_htp", versions={"qnn_sdk": "2.51"} if done else None,
        dvc_stage=f"compile@dense-{device}-{target}-{seq_len}",
    )


def _sensitivity(folder):
    """A sensitivity output: three layer groups of ort_qdq_a8w8, each quantized alone and kept float alone."""
    import pandas as pd

    from tasks.core.schemas import SENSITIVITY_ROWS

    common = {"model": "dense", "variant": "ort_qdq_a8w8", "seq_len": 128, "axis": "float", "eval_set": "stsb",
              "metric_name": "spearman", "eval_items": 200, "fp32_metric": 84.0, "all_lowered_metric": 83.6}
    rows = [{**common, "group": "(all)", "probe": "all", "layers": 4, "macs": 4 * 10**6, "metric_value": 83.6,
             "metric_delta": -0.4, "cosine_to_fp32": 0.995, "seconds": 9.0}]
    for name, alone, kept in [("query+key+value", 83.95, 83.62), ("intermediate/dense", 83.7, 83.85),
                              ("output/dense", 83.98, 83.6)]:
        for probe, value in (("alone", alone), ("kept", kept)):
            rows.append({**common, "group": f"/encoder/layer.0/{name}", "probe": probe, "layers": 1, "macs": 10**6,
                         "metric_value": value, "metric_delta": value - 84.0, "cosine_to_fp32": 0.998, "seconds": 9.0})
    chosen = {"variant": "ort_auto_mixed", "base": "ort_qdq_a8w8", "axis": "float", "budget": 0.3,
              "higher_groups": ["/encoder/layer.0/intermediate/dense"], "groups": 3, "higher_layers": 1, "layers": 5,
              "higher_macs": 10**6, "macs": 3 * 10**6, "eval_items": 1379, "fp32_metric": 84.0, "loss": 0.21,
              "within_budget": True, "steps": [],
              "settings": {"method": "ort_static", "nodes_to_exclude": ["/encoder/layer.0/intermediate/dense/*"]}}
    folder = _stage(folder, model="dense", variant="ort_qdq_a8w8", seq_len=128, assignments={"ort_auto_mixed": chosen})
    pd.DataFrame(rows, columns=list(SENSITIVITY_ROWS.columns)).to_csv(folder / "sensitivity.csv", index=False)
    return folder


def _bundle(folder, variant, device, buckets_ms, static_ms, metric):
    """A bundle output: the target at 128 and 512 as buckets (routed; its own accuracy) and each length alone."""
    common = {"model": "dense", "variant": variant, "device": device, "target": "host", "mix_inputs": 300,
              "bucket_counts": "{}", "threads": 2, "simulated": False, "cpu_model": "AMD EPYC", "cpu_flags": "avx2 fma",
              "engine_version": "x", "tool_versions": "onnxruntime 1.31.1"}
    rows = [{**common, "policy": "buckets", "shapes": "128/512", "contexts": 2, "size_mb": 46.0, "truncated_inputs": 0,
             "latency_mix_mean_ms": buckets_ms, "latency_mix_p50_ms": buckets_ms, "latency_mix_p99_ms": 3 * buckets_ms,
             "metric_name": "spearman", "metric_value": metric, "cosine_to_fp32_mean": 0.999,
             "accuracy_source": "artifact", "eval_truncated_inputs": 0}]
    rows += [{**common, "policy": "static", "shapes": str(L), "contexts": 1, "size_mb": 23.0,
              "truncated_inputs": 4 if L == 128 else 0, "latency_mix_mean_ms": ms, "latency_mix_p50_ms": ms,
              "latency_mix_p99_ms": ms * 1.2} for L, ms in zip((128, 512), static_ms)]
    scores = [{"model": "dense", "variant": variant, "device": device, "target": "host", "policy": "buckets",
               "eval_set": "stsb", "metric_name": "spearman", "metric_value": metric, "higher_is_better": True,
               "items": 1379, "total_items": 1379, "accuracy_source": "artifact"}]
    return _stage(folder, rows=rows, evaluations=scores)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("dashboard")
    sim = dict(target="snapdragon_8_gen_3", simulated=True, timed_runs=3, timing_repeats=1,
               latency_p50_spread_pct=None, latency_stable=False, warm_start_ms=None,
               accuracy_source="cpu_ep_same_graph", sim_items=32, sim_metric_value=80.4,
               sim_cosine_to_cpu_ep_mean=0.9996, sim_cosine_to_cpu_ep_min=0.9991, precision="a16w8 (HTP simulator)")
    bench = [
        _bench(tmp / "b0", _row("fp32", "ort_cpu", 128, 20.0, 82.03), _row("fp32", "ort_cpu", 512, 95.0, 82.03)),
        _bench(tmp / "b1", _row("ort_qdq_a8w8", "ort_cpu", 128, 7.0, 81.7),
               _row("ort_qdq_a8w8", "ort_cpu", 512, 38.0, 81.6, latency_stable=False, latency_p50_spread_pct=9.0)),
        _bench(tmp / "b2", _row("ort_dynamic_int8", "ort_cpu", 128, 5.0, 74.0)),
        _bench(tmp / "b3", _row("ov_nncf_int8", "openvino_cpu", 128, 4.0, 82.07),
               _row("ov_nncf_int8", "openvino_cpu", 512, 19.0, 82.0)),
        _bench(tmp / "b4", _row("ort_qdq_a16w8", "qnn_htp", 128, 2400.0, 81.9, **sim)),
    ]
    compiled = [
        _compile(tmp / "c0", "ort_qdq_a16w8", "qnn_htp", "snapdragon_8_gen_3", 128),
        _compile(tmp / "c1", "ort_qdq_a16w8", "qnn_htp", "snapdragon_x_elite", 128, fallback={"GatherND": 1}),
        _compile(tmp / "c2", "ov_nncf_int8", "openvino_npu", "intel_core_ultra", 128,
                 status="skipped: OpenVINO device NPU not present"),
    ]
    curve_rows = [
        {"model": "dense", "variant": v, "device": d, "target": "host", "seq_len": L, "threads": 2,
         "latency_p50_ms": p, "latency_p90_ms": p, "latency_p99_ms": p, "latency_mean_ms": p, "latency_std_ms": 0.1,
         "timed_runs": 300, "timing_repeats": 3, "latency_p50_spread_pct": 1.0, "latency_stable": True,
         "size_mb": 23.0, "precision": "int8", "engine_version": "x", "measured_by": "latency_curve"}
        for v, d, L, p in [("ort_qdq_a8w8", "ort_cpu", 64, 3.5), ("ort_qdq_a8w8", "ort_cpu", 256, 16.0),
                           ("ov_nncf_int8", "openvino_cpu", 64, 2.0), ("ov_nncf_int8", "openvino_cpu", 256, 8.5)]
    ]
    curve = [_stage(tmp / "curve", rows=curve_rows)]
    # A pruning search in which no level held the budget on the second set.
    levels = [{"head_ratio": h, "ffn_ratio": f, "distill_steps": None, "encoder_weights_kept": kept,
               "scores": {"stsb@128": 81.8, "lee50@128": lee}, "drops": {"stsb@128": 0.23, "lee50@128": 70.0 - lee},
               "worst_drop": 70.0 - lee, "within_budget": False}
              for h, f, kept, lee in [(0.25, 0.5, 0.58, 66.0), (0.0, 0.25, 0.83, 69.2)]]
    pruned = [_stage(tmp / "prune", model="pruned", search={
        "budget": 0.5, "dense": {"stsb@128": 82.03, "lee50@128": 70.0}, "levels": levels, "chosen": None,
        "met_budget": False})]
    text = tmp / "inputs.txt"
    text.write_text("\n".join([f"short input number {i}." for i in range(300)] + ["word " * 100]) + "\n")
    params = ReportParams(seq_len_choice={"text": TextSource(path=text, format="txt")})
    report_run(bench, params, SENTENCE_ENCODER, tmp / "metrics", key="k", model_dir=tiny_bert, text=text,
               compile_dirs=compiled, curve_dirs=curve, prune_dirs=pruned, sensitivity_dirs=[_sensitivity(tmp / "s0")],
               bundle_dirs=[_bundle(tmp / "u0", "fp32", "ort_cpu", 24.0, (20.5, 96.0), 82.03),
                            _bundle(tmp / "u1", "ort_qdq_a8w8", "ort_cpu", 8.0, (7.2, 38.5), 81.7)])
    files = dashboard.write_report(tmp / "metrics", tmp / "reports" / "run1", params.accuracy_budget)
    assert [f.name for f in files] == ["index.html", "report.md", "pareto.svg", "seq_len.svg", "prune_search.svg",
                                       "sensitivity.svg", "bundles.svg"]
    return tmp / "reports" / "run1"


def test_report_is_self_contained_and_says_what_to_deploy(report_dir):
    page = (report_dir / "index.html").read_text()
    # Offline: no scripts, stylesheets or images fetched from anywhere (SVG namespaces are not fetches).
    assert not re.search(r"<script|<link|src=|@import|url\((?!#)", page)  # url(#id): clip paths in the SVGs
    assert page.count("<svg") == 5
    # 300 of 301 inputs are short: 64 tokens keep 99.7 %, so the latency curve's 64 is recommended.
    assert "64 tokens keep 99.7% of 301 inputs whole" in page
    assert "snapdragon_8_gen_3" in page and "(sim)" in page  # simulated latency is marked
    assert "GatherND x1" in page and "skipped: OpenVINO device NPU not present" in page  # placement
    assert re.search(r"\w+/ort_qdq_a8w8/ort_cpu/host/512 \(\d+ %\)", page)  # the unstable row, with its spread
    md = (report_dir / "report.md").read_text()
    for heading in ("## Recommended artifact per device", "## Latency vs accuracy", "## Accuracy on every evaluation set",
                    "## Op placement", "## Tools and machine"):
        assert heading in md
    assert "![latency vs accuracy](pareto.svg)" in md and "onnxruntime" in md and "AMD EPYC" in md
    # The pruning search: every level tried with its drop per set, and plainly that dense is recommended.
    assert "No pruning level of model &#x27;pruned&#x27; stayed within 0.5 points" in page
    assert "the dense model is recommended" in md and "## Pruning strength: the levels tried" in md
    assert "66.00 (-4.00)" in md and "69.20 (-0.80)" in md and "![pruning strengths tried](prune_search.svg)" in md
    # Per-layer sensitivity: each group's cost quantized alone (vs fp32) and gain kept float alone (vs all quantized).
    assert "## Per-layer sensitivity" in md and "![per-layer sensitivity](sensitivity.svg)" in md
    assert re.search(r"\| intermediate/dense +\| 1 +\| 1 +\| -0\.30 +\| \+0\.25 +\|", md), md
    # What auto_mixed chose, and the same as a params.yaml variant to paste.
    assert "## Mixed precision chosen (auto_mixed)" in md and "1 of 3 float, the rest quantized" in md
    assert "4 of 5" in md and "+0.210 on 1379" in md
    assert "    ort_auto_mixed:\n      method: ort_static\n      nodes_to_exclude:\n      - /encoder/layer.0/intermediate/dense/*" in md
    # Latency on the inputs: static 128 cuts 4 of 300 (98.7 % < the 99 % coverage), so buckets win over static 512.
    assert "## Latency on your inputs: static length vs buckets" in md and "![latency on your inputs](bundles.svg)" in md
    assert "buckets 128/512: 4.81x faster on your inputs than static 512 (dense ort_qdq_a8w8)" in md
    # The metric is named for what it is (the evaluation set and its metric), not assumed.
    assert "stsb Spearman x100" in page and "74.00 (-8.03, over budget)" in md


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (apt-get install chromium; CI installs it)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    import matplotlib.image

    shown = render(report_dir / "index.html")
    assert shown.errors == []
    assert all(url.startswith("file://") for url in shown.requests), shown.requests
    # Every plot (latency vs accuracy, vs length, the pruning search, sensitivity, bundles) is laid out readably.
    assert len(shown.svg_sizes) == 5 and all(w > 500 and h > 250 for w, h in shown.svg_sizes), shown.svg_sizes
    pixels = matplotlib.image.imread(io.BytesIO(shown.screenshot), format="png")[..., :3]
    (tmp_path / "report.png").write_bytes(shown.screenshot)
    not_white = (pixels < 0.95).any(axis=-1).mean()
    colours = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert not_white > 0.05 and colours > 50, (not_white, colours)


def test_plots_are_drawn_once_per_distinct_data(report_dir, tmp_path, monkeypatch):
    metrics, cache = report_dir.parent.parent / "metrics", tmp_path / "plots"
    first = dashboard.write_report(metrics, tmp_path / "a", 0.5, plot_cache=cache)
    assert len(list(cache.glob("*.svg"))) == 5

    def no_drawing(*args):
        raise AssertionError("redrawn although the data did not change")

    monkeypatch.setattr(dashboard, "plot_pareto", no_drawing)
    monkeypatch.setattr(dashboard, "plot_seq_len", no_drawing)
    monkeypatch.setattr(dashboard, "plot_prune_search", no_drawing)
    monkeypatch.setattr(dashboard, "plot_sensitivity", no_drawing)
    again = dashboard.write_report(metrics, tmp_path / "b", 0.5, plot_cache=cache)
    assert [f.read_text() for f in again if f.suffix == ".svg"] == [f.read_text() for f in first if f.suffix == ".svg"]
    with pytest.raises(AssertionError, match="redrawn"):  # another budget line is another plot
        dashboard.write_report(metrics, tmp_path / "c", 1.0, plot_cache=cache)
