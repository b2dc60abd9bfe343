"""CLI wiring of `run --quick`, `report` and `compare` (their outcomes are tested in test_pipeline.py)."""

from __future__ import annotations

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_run_quick_passes_the_quick_override_to_the_flow(workspace, monkeypatch):
    import flows.pipeline

    seen = {}

    class Stopped:
        name = flows.pipeline.USER_ERROR
        message = "stopped by the test"

    def fake_pipeline(**kwargs):
        seen.update(kwargs)
        return Stopped()

    monkeypatch.setattr(flows.pipeline, "pipeline", fake_pipeline)
    result = runner.invoke(app, ["run", "--quick"])
    assert result.exit_code == 1 and "stopped by the test" in result.output
    assert seen["overrides"] == {"benchmark": {"quick": True}}


def test_report_without_metrics_is_a_one_line_error(workspace):
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "metrics/benchmark.csv: not found; run `edgeopt run`" in result.output
    assert not (workspace / "reports").exists()


def test_compare_unknown_run_is_a_one_line_error(workspace):
    result = runner.invoke(app, ["compare", "nope-a", "nope-b"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "MLflow run 'nope-a' not found" in result.output
