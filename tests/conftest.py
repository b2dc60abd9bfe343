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

REPO = Path(__file__).resolve().parents[1]
STSB_DIR = (REPO.parent / "shared" / "data" / "stsb").resolve()
# What a project checkout needs to run the pipeline (the rest is docs, tests and CI).
PROJECT_FILES = ("tasks", "flows", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore")


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
    from tasks.config import ExportOnnxParams
    from tasks.export_onnx import run as export_onnx

    out = tmp_path_factory.mktemp("export") / "seq16"
    export_onnx(tiny_bert, 16, ExportOnnxParams(), out, key="t")
    return out / "model.onnx"


def tiny_params(model_dir: Path, **overrides) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seq_lens"] = [16, 32]
    params["models"] = ["dense"]  # the pruned model's path through the DAG: tests/test_prune_pipeline.py
    params["data"]["stsb_dir"] = str(STSB_DIR)
    params["paths"]["read_roots"] = [str(STSB_DIR.parent), str(model_dir.parent)]
    params["fetch_model"].update(source="path", path=str(model_dir))
    params["benchmark"].update(threads=1, warmup_runs=2, timed_runs=50, repeats=2, stsb_pairs=40)
    params["reference"].update(sentences=40)
    params["calibration_data"].update(
        samples=16,
        sources=[{"path": str(STSB_DIR / f"sts-{split}.csv"), "format": "stsb"} for split in ("train", "dev")],
    )
    # fp32 benchmarked, and the QNN recipe compiled for one SoC (the HTP simulator takes seconds on a
    # tiny model): the whole DAG, kept small. Quantization accuracy is tested in tests/tasks.
    params["variants"] = ["fp32", "ort_qdq_a16w8"]
    params["targets"] = [{"variant": "fp32", "device": "ort_cpu"}]
    # Random tiny weights make one 32-token verification input come out at cosine ~0.78 between the
    # HTP simulator and the CPU EP (the rest >= 0.999); the real MiniLM holds 0.999 (README table).
    params["compile"].update(
        jobs=[{"variant": "ort_qdq_a16w8", "device": "qnn_htp", "target": "snapdragon_8_gen_3"}],
        threads=1,
        verify_min_cosine=0.7,
    )
    for section, values in overrides.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    return params


def write_params(workspace: Path, params: dict) -> None:
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def workspace(tmp_path, tiny_bert, monkeypatch) -> Path:
    """A fresh project checkout (git + dvc initialised) configured for the tiny BERT."""
    ws = tmp_path / "project"
    ws.mkdir()
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, ws / name)
    write_params(ws, tiny_params(tiny_bert))
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
