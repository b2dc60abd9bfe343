"""The CLI turns user errors into one line and a non-zero exit; it never shows a traceback."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_validate_prints_resolved_config(workspace):
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert '"seq_lens": [' in result.output


def test_bad_params_one_line_exit_1(workspace):
    (workspace / "params.yaml").write_text("seq_lens: [0]\n")
    for command in (["validate"], ["run"], ["stage", "fetch_model"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, command
        assert "params.yaml: seq_lens" in result.output
        assert "Traceback" not in result.output


def test_stage_runner_names_missing_options(workspace):
    result = runner.invoke(app, ["stage", "benchmark", "--seq-len", "16"])
    assert result.exit_code == 1
    assert "needs --variant --device" in result.output
    result = runner.invoke(app, ["stage", "quantise"])
    assert result.exit_code == 1 and "unknown stage 'quantise'" in result.output


def test_a_stage_reaps_the_scratch_of_a_killed_command_and_leaves_none(workspace):
    """`dvc repro` runs each stage as `edgeopt stage`: its temp files live under the project, like a run's, and the
    next command removes what a killed one (a pid that is gone) left behind."""
    import subprocess
    import sys

    from flows.locking import SCRATCH

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = workspace / SCRATCH / gone.stdout.strip()
    left.mkdir(parents=True)
    (left / "edgeopt-quant-x").mkdir()
    result = runner.invoke(app, ["stage", "fetch_model"])
    assert result.exit_code == 0, result.output
    assert list((workspace / SCRATCH).iterdir()) == []


def test_stage_runner_bad_model_path(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["fetch_model"]["path"] = "models/missing"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["stage", "fetch_model"])
    assert result.exit_code == 1
    assert "models/missing: not found; fix fetch_model.path" in result.output
    assert not (workspace / "artifacts").exists()


@pytest.mark.parametrize("where", ["../elsewhere/data.csv", "/etc/passwd"])
def test_params_paths_cannot_leave_the_project_unless_allowed(workspace, where):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["calibration_data"]["sources"] = [{"path": where, "format": "txt"}]
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    for command in (["run"], ["stage", "calibration_data"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, command
        assert f"calibration_data.sources[0].path: {where} is outside the project; add its folder to " \
               "paths.read_roots" in result.output
    assert not (workspace / "artifacts").exists()


def test_results_before_any_run_is_one_line_error(workspace):
    result = runner.invoke(app, ["results"])
    assert result.exit_code == 1
    assert "metrics/benchmark.csv: not found; run `edgeopt run`" in result.output
    assert "Traceback" not in result.output



def test_results_from_an_older_metrics_contract_is_one_line_error(workspace):
    metrics = workspace / "metrics"
    metrics.mkdir(exist_ok=True)
    (metrics / "benchmark.csv").write_text("model,variant,device,seq_len,stsb_spearman\ndense,fp32,ort_cpu,128,82.0\n")
    (metrics / "compile.csv").write_text("model,variant,device,target,seq_len,status\n")
    (metrics / "summary.json").write_text("{}")
    result = runner.invoke(app, ["results", "--markdown"])
    assert result.exit_code == 1
    assert "metrics/benchmark.csv: no column " in result.output and "rerun `edgeopt run`" in result.output
    assert "Traceback" not in result.output

def test_missing_data_file_stops_the_run_before_any_stage(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["calibration_data"]["sources"][0]["path"] = "data/missing.csv"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 1
    assert "data/missing.csv: not found; fix calibration_data.sources[0].path in params.yaml" in result.output
    assert "Traceback" not in result.output
    assert not (workspace / "artifacts").exists()
