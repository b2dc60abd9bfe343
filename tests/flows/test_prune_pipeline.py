"""A pruned model runs the whole DAG beside the dense one and is judged against both; its strength is
searched against the budget, and the search scores what the benchmark later measures."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from flows.pipeline import pipeline
from tasks.core.fingerprint import read_stamp
from tasks.stages.report import REPORT_TABLE


@pytest.mark.slow  # ~3.5 min: a pruned model distilled and run through the DAG beside the dense one
def test_pruned_model_flows_through_every_stage(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["seq_lens"] = [16]
    params["models"] = ["dense", "pruned"]
    params["prune"]["models"]["pruned"]["search"] = [{"head_ratio": 0.5, "ffn_ratio": 0.5}, {"ffn_ratio": 0.25}]
    params["prune"]["models"]["pruned"]["distill"].update(steps=4, batch_size=4, max_tokens=16)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result = pipeline(project_dir=str(workspace))
    ran = set(result["stages"])
    for stage in ("prune@pruned", "export_onnx@pruned-16", "graph_surgery@pruned-16",
                  "quantize@pruned-ort_qdq_a16w8-16", "compile@pruned-job0-16", "benchmark@pruned-target0-16"):
        assert stage in ran, stage

    pruned = read_stamp(workspace / "artifacts/prune/pruned")
    dense = read_stamp(workspace / "artifacts/prune/dense")
    assert pruned["params_ratio"] < 0.75 and dense["params_ratio"] == 1
    assert pruned["params_before"] == dense["params_after"]

    table = REPORT_TABLE.validate(pd.read_csv(workspace / "metrics" / "benchmark.csv")).set_index("model")
    assert set(table.index) == {"dense", "pruned"}
    assert table.loc["pruned", "size_mb"] < table.loc["dense", "size_mb"]
    assert table.loc["pruned", "drop_vs_own_fp32"] == 0  # its own fp32 row
    dense_minus_pruned = table.loc["dense", "metric_value"] - table.loc["pruned", "metric_value"]
    assert table.loc["pruned", "metric_drop"] == pytest.approx(dense_minus_pruned, abs=1e-3)

    # The search's torch scores are what ONNX Runtime measures on the static-shape exports afterwards.
    search = pruned["search"]
    written = search["chosen"] if search["met_budget"] else len(search["levels"]) - 1
    assert len(search["levels"]) == (written + 1)
    assert search["dense"]["stsb@16"] == pytest.approx(table.loc["dense", "metric_value"], abs=0.05)
    pruned_fp32 = table.loc["pruned", "metric_value"]
    assert search["levels"][written]["scores"]["stsb@16"] == pytest.approx(pruned_fp32, abs=0.05)
    walk = pd.read_csv(workspace / "metrics" / "prune_search.csv")
    assert walk["level"].tolist() == list(range(1, written + 2)) and walk["chosen"].sum() == int(search["met_budget"])
