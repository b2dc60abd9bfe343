"""It never lies and never loses work: real kills, concurrent runs, user errors inside stages, full disks."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import write_params
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import pipeline
from tasks.core.fingerprint import read_stamp
from tasks.stages.report import REPORT_TABLE


def _edgeopt_env(tmp_path: Path) -> dict[str, str]:
    """Subprocesses talk to the session's Prefect test server instead of starting their own."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect")}


def _start_run(workspace: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    edgeopt = Path(sys.executable).with_name("edgeopt")
    return subprocess.Popen(
        [str(edgeopt), "run"], cwd=workspace, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill reaches the benchmark worker too
    )


def _wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout_s: float = 300) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {pattern} appeared"
        time.sleep(0.05)
    raise AssertionError(f"{pattern} did not appear within {timeout_s} s")


KILL_POINTS = {
    # stage whose scratch folder marks "mid-stage", its output folder, and what finished before it
    "export": ("artifacts/export_onnx/dense/.seq16.tmp-*", "artifacts/export_onnx/dense/seq16",
               "export_onnx@dense-16", {"fetch_model", "calibration_data"}),
    "quantize": ("artifacts/quantize/dense/.ort_qdq_a16w8-16.tmp-*", "artifacts/quantize/dense/ort_qdq_a16w8-16",
                 "quantize@dense-ort_qdq_a16w8-16", {"fetch_model", "export_onnx@dense-16", "graph_surgery@dense-16"}),
    "benchmark": ("artifacts/benchmark/dense/.fp32-ort_cpu-16.tmp-*", "artifacts/benchmark/dense/fp32-ort_cpu-16",
                  "benchmark@dense-target0-16", {"quantize@dense-fp32-16", "compile@dense-job0-16"}),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_mid_stage_leaves_nothing_mistaken_for_done(workspace, tmp_path, point):
    scratch_glob, out_dir, stage, finished_before = KILL_POINTS[point]
    proc = _start_run(workspace, _edgeopt_env(tmp_path), tmp_path / "run.log")
    try:
        scratch = _wait_for(scratch_glob, workspace, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert scratch.parent.exists() and not (workspace / out_dir).exists(), "a killed stage must leave no output"

    result = pipeline(project_dir=str(workspace))
    assert stage not in {n for n, s in result["stages"].items() if s == "Cached"}
    assert finished_before <= {n for n, s in result["stages"].items() if s == "Cached"}, "finished work is reused"
    assert read_stamp(workspace / out_dir)["key"]
    assert not list(workspace.glob("artifacts/**/.*.tmp-*")), "the rerun removed the killed run's scratch"
    REPORT_TABLE.validate(pd.read_csv(workspace / "metrics" / "benchmark.csv"))


@pytest.mark.slow  # a minute or more: the tiny DAG several times, or servers
def test_two_runs_at_once_do_not_corrupt_each_other(workspace, tmp_path):
    env = _edgeopt_env(tmp_path)
    runs = [_start_run(workspace, env, tmp_path / f"run{i}.log") for i in range(2)]
    for proc in runs:
        assert proc.wait(timeout=600) == 0, (tmp_path / f"run{runs.index(proc)}.log").read_text()[-5000:]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    waited = [log for log in logs if "run.lock: held by pid" in log]
    assert len(waited) == 1, "exactly one run waited for the other"
    assert "waiting for it to finish" in waited[0]
    REPORT_TABLE.validate(pd.read_csv(workspace / "metrics" / "benchmark.csv"))
    # The run that waited found every stage done by the first.
    assert executed_after(workspace) == set()


def executed_after(workspace: Path) -> set[str]:
    result = pipeline(project_dir=str(workspace))
    return {name for name, state in result["stages"].items() if state != "Cached"}


def test_user_error_inside_a_stage_is_one_line_without_traceback(workspace, tmp_path):
    (workspace / "notes.txt").write_bytes(b"\x00\x01 not text")
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["calibration_data"]["sources"] = [{"path": "notes.txt", "format": "txt"}]
    write_params(workspace, params)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("edgeopt")), "run"], cwd=workspace, env=_edgeopt_env(tmp_path),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert "error: calibration_data: notes.txt: binary file (NUL byte at offset 0); a text source must be UTF-8 text" \
        in " ".join(output.split())
    assert "Traceback" not in output
    assert not (workspace / "artifacts" / "calibration_data").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_full_disk_or_no_permission_is_one_line_and_writes_nothing(workspace, monkeypatch, code):
    import tasks.core.fingerprint as fingerprint

    real = fingerprint.tempfile

    class _NoRoom:
        """tempfile as seen by the stage writers, on a disk that refuses new files."""

        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def mkdtemp(*args, dir=None, **kwargs):
            raise OSError(code, os.strerror(code), str(dir))

    monkeypatch.setattr(fingerprint, "tempfile", _NoRoom())
    result = CliRunner().invoke(app, ["stage", "fetch_model"])
    assert result.exit_code == 1
    assert f"error: cannot write artifacts: {os.strerror(code)}; free space or fix permissions" in " ".join(
        result.output.split()
    )
    assert "Traceback" not in result.output
    assert not [p for p in (workspace / "artifacts").rglob("*") if p.is_file()]
