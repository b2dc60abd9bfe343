"""A pruned model runs the whole DAG beside the dense one and is judged against both (issue 6)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from flows.pipeline import pipeline
from tasks.core.fingerprint import read_stamp
from tasks.stages.report import REPORT_TABLE


def test_pruned_model_flows_through_every_stage(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["seq_lens"] = [16]
    params["models"] = ["dense", "pruned"]
    params["prune"]["models"]["pruned"].update(head_ratio=0.5, ffn_ratio=0.5)
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
