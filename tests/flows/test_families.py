"""Bring your own model: every encoder architecture the text families support, and a classifier with its
own labelled data, through the whole DAG (export -> surgery -> every default recipe -> compile for the QNN
HTP simulator and OpenVINO CPU -> benchmark -> report), each reported under its own metric.

A full flow per architecture takes a few minutes on 2 cores: slow tests, run in CI.
"""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import STSB_DIR, make_workspace, tiny_params
from tiny_models import ARCHITECTURES, CLASSES, WORDS, make_tiny_classifier, make_tiny_encoder

from flows.pipeline import pipeline
from tasks.core.schemas import COMPILE_ROWS, EVALUATION_ROWS
from tasks.stages.report import REPORT_TABLE

QUANTIZED = {"ort_qdq_a8w8": "ort_cpu", "ort_qdq_a8w8_allops": "ort_cpu", "ort_qdq_a16w8": "ort_cpu",
             "ort_dynamic_int8": "ort_cpu", "ov_nncf_int8": "openvino_cpu"}


def _params(model_dir, family: dict, evaluation: list[dict]) -> dict:
    params = tiny_params(model_dir)
    params.update(seq_lens=[16], variants=["fp32", *QUANTIZED], family=family, evaluation={"sets": evaluation},
                  targets=[{"variant": "fp32", "device": "ort_cpu"},
                           *({"variant": v, "device": d} for v, d in QUANTIZED.items()),
                           {"variant": "ort_qdq_a16w8", "device": "qnn_htp"}])
    params["compile"]["jobs"] = [{"variant": "ort_qdq_a16w8", "device": "qnn_htp", "target": "snapdragon_8_gen_3"},
                                 {"variant": "ov_nncf_int8", "device": "openvino_cpu", "target": "host"}]
    params["compile"]["verify_min_cosine"] = 0.999
    params["benchmark"].update(quick=True, quick_simulator_items=2)
    return params


def _check_dag(workspace, result, variants_on_qnn=("ort_qdq_a16w8",)):
    assert all(state != "Failed" for state in result["stages"].values()), result["stages"]
    compiled = COMPILE_ROWS.validate(pd.read_csv(workspace / "metrics" / "compile.csv"))
    assert list(compiled["status"]) == ["compiled", "compiled"]
    qnn = compiled[compiled["device"] == "qnn_htp"]
    assert (qnn["cpu_fallback_nodes"] == 0).all() and (qnn["npu_nodes"] > 10).all()
    assert (compiled["verify_min_cosine"] >= 0.999).all()
    table = REPORT_TABLE.validate(pd.read_csv(workspace / "metrics" / "benchmark.csv"))
    assert set(table["variant"]) == {"fp32", *QUANTIZED}
    assert set(table.loc[table["device"] == "qnn_htp", "variant"]) == set(variants_on_qnn)
    return table


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_encoder_architecture_runs_the_dag(tmp_path, monkeypatch, architecture):
    model = make_tiny_encoder(tmp_path / "models" / architecture, architecture)
    stsb = {"name": "stsb", "format": "sentence_pairs", "reader": "stsb", "path": str(STSB_DIR / "sts-test.csv"),
            "max_items": 20}
    workspace = make_workspace(tmp_path, _params(model, {"name": "sentence_encoder"}, [stsb]), monkeypatch)
    table = _check_dag(workspace, pipeline(project_dir=str(workspace)))
    assert (table["metric_name"] == "spearman").all() and (table["eval_set"] == "stsb").all()
    fp32 = table[table["variant"] == "fp32"].iloc[0]
    assert fp32["cosine_to_fp32_min"] > 0.9999 and fp32["metric_drop"] == 0


@pytest.mark.slow
def test_a_classifier_with_its_own_labelled_data(tmp_path, monkeypatch):
    """A DistilBERT classifier scored on a user's labelled CSV: the metric, the budget and MLflow say accuracy."""
    model = make_tiny_classifier(tmp_path / "models" / "classifier")
    texts = [" ".join(WORDS[i:i + 5]) for i in range(30)]
    labelled = tmp_path / "data" / "reviews.csv"
    labelled.parent.mkdir()
    pd.DataFrame({"review": texts, "sentiment": [CLASSES[i % 3] for i in range(30)]}).to_csv(labelled, index=False)
    evaluation = [{"name": "reviews", "format": "labelled_text", "path": str(labelled), "text": "review",
                   "label": "sentiment", "metric": "accuracy"}]
    params = _params(model, {"name": "text_classifier"}, evaluation)
    params["paths"]["read_roots"].append(str(labelled.parent))
    workspace = make_workspace(tmp_path, params, monkeypatch)
    result = pipeline(project_dir=str(workspace))
    table = _check_dag(workspace, result)
    assert (table["metric_name"] == "accuracy").all() and (table["eval_set"] == "reviews").all()
    assert table["stsb_spearman"].isna().all() and (table["eval_items"] == 30).all()
    assert table["metric_value"].between(0, 100).all()
    scores = EVALUATION_ROWS.validate(pd.read_csv(workspace / "metrics" / "evaluation.csv"))
    assert set(scores["eval_set"]) == {"reviews"}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result["mlflow_tracking_uri"])
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    benchmarks = [c for c in children if c.data.tags["kind"] == "benchmark"]
    assert benchmarks and all(c.data.params["metric_name"] == "accuracy" for c in benchmarks)


@pytest.mark.slow
def test_a_users_own_pairs_csv_drives_the_run(tmp_path, monkeypatch, tiny_bert):
    pairs = tmp_path / "data" / "pairs.csv"
    pairs.parent.mkdir()
    left = [" ".join(WORDS[i:i + 4]) for i in range(24)]
    right = [" ".join(WORDS[i + 1:i + 6]) for i in range(24)]
    pd.DataFrame({"q": left, "a": right, "relatedness": [i % 5 for i in range(24)]}).to_csv(pairs, index=False)
    evaluation = [{"name": "mine", "format": "sentence_pairs", "path": str(pairs), "sentence1": "q",
                   "sentence2": "a", "score": "relatedness"}]
    params = _params(tiny_bert, {"name": "sentence_encoder"}, evaluation)
    params["paths"]["read_roots"].append(str(pairs.parent))
    workspace = make_workspace(tmp_path, params, monkeypatch)
    table = _check_dag(workspace, pipeline(project_dir=str(workspace)))
    assert (table["eval_set"] == "mine").all() and table["stsb_spearman"].isna().all()
    assert "mine Spearman x100" in next((workspace / "reports").rglob("index.html")).read_text()
