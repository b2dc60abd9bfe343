"""The CLI turns user errors into one line and a non-zero exit; it never shows a traceback."""

from __future__ import annotations

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


def test_stage_runner_bad_model_path(workspace, tmp_path):
    (workspace / "params.yaml").write_text(
        f"fetch_model: {{source: path, path: {tmp_path / 'missing'}}}\n"
    )
    result = runner.invoke(app, ["stage", "fetch_model"])
    assert result.exit_code == 1
    assert "fetch_model.path" in result.output and "does not exist" in result.output
    assert not (workspace / "artifacts").exists()
