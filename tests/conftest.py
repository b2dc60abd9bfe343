"""Shared fixtures: tiny random encoders and throwaway project workspaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import make_tiny_encoder

from tasks.families.sentence_encoder import SentenceEncoderSettings

REPO = Path(__file__).resolve().parents[1]
STSB_DIR = (REPO.parent / "shared" / "data" / "stsb").resolve()
# What a project checkout needs to run the pipeline (the rest is docs, tests and CI).
PROJECT_FILES = ("tasks", "flows", "params.yaml", ".dvcignore", ".gitignore")
SENTENCE_ENCODER = SentenceEncoderSettings()
STSB_TEST = STSB_DIR / "sts-test.csv"
WIKIPEDIA = REPO / "data" / "wikipedia" / "summaries_en-us.json"


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """One temporary Prefect backend for the whole session (starting one takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny") / "bert", "bert")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT exported at sequence length 16 (tests/tasks, one export per session)."""
    from tasks.stages.export_onnx import ExportOnnxParams
    from tasks.stages.export_onnx import run as export_onnx

    out = tmp_path_factory.mktemp("export") / "seq16"
    export_onnx(tiny_bert, 16, ExportOnnxParams(), SENTENCE_ENCODER, out, key="t")
    return out / "model.onnx"


@pytest.fixture(scope="session")
def tiny_onnx32(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT exported at sequence length 32 (graph surgery tests: room for padding)."""
    from tasks.stages.export_onnx import ExportOnnxParams
    from tasks.stages.export_onnx import run as export_onnx

    out = tmp_path_factory.mktemp("export") / "seq32"
    export_onnx(tiny_bert, 32, ExportOnnxParams(), SENTENCE_ENCODER, out, key="t")
    return out / "model.onnx"


@pytest.fixture(scope="session")
def tiny_dynamic(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT exported at 32 tokens with `export_onnx.dynamic`: the folder holding model.onnx (static)
    and model_dynamic.onnx (any length up to 32)."""
    from tasks.stages.export_onnx import ExportOnnxParams
    from tasks.stages.export_onnx import run as export_onnx

    out = tmp_path_factory.mktemp("export") / "dynamic32"
    export_onnx(tiny_bert, 32, ExportOnnxParams(dynamic=True), SENTENCE_ENCODER, out, key="t")
    return out


@pytest.fixture(scope="session")
def tokens32(tiny_bert) -> dict:
    """Three sentences of different lengths at length 32, every row padded."""
    from tasks.families.sentence_encoder import FAMILY

    texts = ["a man is playing a guitar.", "two dogs are running in the street with a red ball.", "a cat."]
    arrays = FAMILY.samples(FAMILY.load_preprocessor(tiny_bert), texts, 32)
    assert (arrays["attention_mask"].sum(axis=1) < 32).all()
    return arrays


@pytest.fixture
def one_thread():
    """Tiny models are all overhead: two OpenMP threads on a busy 2-core machine spin-wait (~20x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_fixed(tiny_onnx, tmp_path_factory) -> Path:
    """What graph_surgery does to the mask: the float-min fill becomes -1e4."""
    import onnx

    from tasks.transforms.surgery import fix_mask_fill

    model = onnx.load(tiny_onnx)
    assert fix_mask_fill(model, -1e4)["count"] == 1
    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def calib(tiny_bert, tmp_path_factory) -> Path:
    """12 calibration rows for the tiny BERT at length 16 (the family's samples)."""
    import numpy as np
    from helpers import sentences

    from tasks.families.sentence_encoder import FAMILY

    path = tmp_path_factory.mktemp("calib") / "calib_seq16.npz"
    np.savez(path, **FAMILY.samples(FAMILY.load_preprocessor(tiny_bert), sentences(12, 0), 16))
    return path


@pytest.fixture(scope="session")
def eval_feeds(tiny_bert) -> dict:
    """6 other sentences for the tiny BERT at length 16."""
    from helpers import sentences

    from tasks.families.sentence_encoder import FAMILY

    return FAMILY.samples(FAMILY.load_preprocessor(tiny_bert), sentences(6, 1), 16)


def tiny_params(model_dir: Path, **overrides) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seq_lens"] = [16, 32]
    params["models"] = ["dense"]  # the pruned model's path through the DAG: tests/test_prune_pipeline.py
    params["evaluation"]["sets"] = [
        {"name": "stsb", "format": "sentence_pairs", "reader": "stsb", "path": str(STSB_TEST), "max_items": 40}
    ]
    params["paths"]["read_roots"] = [str(STSB_DIR.parent), str(model_dir.parent), str(REPO / "data")]
    params["fetch_model"].update(source="path", path=str(model_dir))
    params["report"]["seq_len_choice"]["text"] = {"path": str(STSB_DIR / "sts-train.csv"), "format": "stsb"}
    params["benchmark"].update(threads=1, warmup_runs=2, timed_runs=50, repeats=2)
    params["reference"].update(samples=40)
    # The project's own text pool (infra/data/fetch.sh): STS-B train/dev share sentences with its test split.
    params["calibration_data"].update(
        samples=16, sources=[{**params["calibration_data"]["sources"][0], "path": str(WIKIPEDIA)}]
    )
    # fp32 benchmarked, and the QNN recipe compiled for one SoC (the HTP simulator takes seconds on a
    # tiny model): the whole DAG, kept small. Quantization accuracy is tested in tests/tasks.
    params["variants"] = ["fp32", "ort_qdq_a16w8"]
    params["targets"] = [{"variant": "fp32", "device": "ort_cpu"}]
    params["sensitivity"]["variants"] = []  # its own tests: tests/tasks/stages/test_sensitivity.py, test_pipeline.py
    # The compiled context must reproduce its source at the project's bar (compile.verify_min_cosine 0.999).
    params["compile"].update(
        jobs=[{"variant": "ort_qdq_a16w8", "device": "qnn_htp", "target": "snapdragon_8_gen_3"}], threads=1
    )
    for section, values in overrides.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    return params


def write_params(workspace: Path, params: dict) -> None:
    """params.yaml, and the dvc.yaml it makes (as `edgeopt dvc-yaml` would)."""
    from flows import dvc_yaml
    from tasks.config import load_config

    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_yaml.write(load_config(workspace / "params.yaml"), workspace)


def make_workspace(tmp_path: Path, params: dict, monkeypatch) -> Path:
    """A fresh project checkout (git + dvc initialised) with these params, as the working directory."""
    ws = tmp_path / "project"
    ws.mkdir()
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, ws / name)
    write_params(ws, params)
    # `dvc` and the `edgeopt` it calls come from the interpreter running the tests, as they
    # would from an activated venv; never from whatever else is on PATH.
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=ws, check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=ws, check=True)
    # Stage subprocesses (dvc repro, benchmark workers) import this checkout's code.
    monkeypatch.setenv("PYTHONPATH", str(ws) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.chdir(ws)
    return ws


@pytest.fixture
def workspace(tmp_path, tiny_bert, monkeypatch) -> Path:
    """A fresh project checkout configured for the tiny BERT."""
    return make_workspace(tmp_path, tiny_params(tiny_bert), monkeypatch)


@pytest.fixture
def stack(workspace):
    """MLflow, Prefect server and worker for the tiny workspace, on free ports; stopped however the
    test ends."""
    from flows import services

    params = services.ServicesParams(prefect_port=services.free_port(), mlflow_port=services.free_port(),
                                      worker_poll_s=1)
    try:
        services.start(workspace, params)
        yield params
    finally:
        services.stop(workspace)
