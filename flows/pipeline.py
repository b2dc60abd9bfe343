"""The edgeopt Prefect flow, wiring only:
fetch → calibration data → per model and length: export → reference → graph surgery → quantize →
compile (fanned out over jobs) → benchmark (fanned out over targets) → latency curve (extra lengths,
when asked) → report → the HTML/Markdown report in reports/<run>/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.futures import wait
from prefect.serializers import JSONSerializer
from prefect.states import Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows import stages
from flows.caching import StageCachePolicy, results_dir
from flows.locking import workspace_lock
from flows.tracking import log_pipeline
from tasks import catalog, dashboard
from tasks.config import ExecutionParams, load_config
from tasks.errors import ConfigError, EdgeoptError

# State name of a stage stopped by an error the user can fix (bad input, failed check): the flow
# ends Failed with that one-line message instead of a traceback. Other exceptions are bugs and
# keep their tracebacks.
USER_ERROR = "UserError"


@task(
    cache_policy=StageCachePolicy(),
    persist_result=True,
    result_serializer=JSONSerializer(),
    task_run_name="{call.name}",
)
def run_stage(call: stages.StageCall) -> dict | State:
    try:
        return call.execute()
    except EdgeoptError as exc:
        return Failed(name=USER_ERROR, message=f"{call.name}: {exc}")


def _stage_task():
    return run_stage.with_options(result_storage=results_dir())


class _Stop(Exception):
    """A stage ended in a user error; carries its one-line message out of the flow body."""


def _settle(call: stages.StageCall, state: State, states: dict[str, str]) -> dict:
    states[call.name] = state.name
    if state.name == USER_ERROR:
        raise _Stop(state.message)
    return state.result()  # re-raises a bug's exception with its traceback


def _run(call: stages.StageCall, states: dict[str, str]) -> dict:
    return _settle(call, _stage_task()(call=call, return_state=True), states)


def task_runner(params: ExecutionParams) -> TaskRunner:
    """Where fanned-out stages (compile, benchmark, latency curve) run: threads of this process, or
    the processes of a Dask cluster (a scheduler at `dask_address`, or a local cluster)."""
    if params.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=params.max_workers)
    from prefect.settings import PREFECT_API_URL
    from prefect_dask import DaskTaskRunner

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise ConfigError(
            "execution.task_runner: dask needs a running Prefect server that its workers report to; start one "
            '(`edgeopt services start prefect-server`, then `eval "$(edgeopt services env)"`) or use threads'
        )
    os.environ.setdefault("PREFECT_API_URL", api_url)  # inherited by local cluster workers
    if params.dask_address:
        return DaskTaskRunner(address=params.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": params.dask_workers, "threads_per_worker": 1, "processes": True})


def _fan_out(calls: list[stages.StageCall], states: dict[str, str], execution: ExecutionParams) -> list[dict]:
    """Run independent stage calls on the configured task runner (all finish before a failure stops the flow)."""
    if not calls:
        return []
    with task_runner(execution) as runner:
        client = getattr(runner, "client", None)
        if client is not None:  # Dask workers resolve the stages' project-relative paths from here
            client.run(os.chdir, os.getcwd())
        futures = runner.map(_stage_task(), parameters={"call": calls})
        wait(futures)
        return [_settle(call, future.state, states) for call, future in zip(calls, futures)]


def sync_dvc_lock(root: Path) -> bool:
    """Record this run's outputs in dvc.lock so `dvc status` agrees that the pipeline is current."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return False
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.commit(force=True)
    return True


@flow(name="edgeopt-pipeline", log_prints=True)
def pipeline(project_dir: str = ".", params_file: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    """Run the DAG in `project_dir`. `overrides` (e.g. from a deployment) are merged into
    `params_file`; such a run does not update dvc.lock, which describes `params_file` alone."""
    root = Path(project_dir).resolve()
    os.chdir(root)  # stage paths are relative to the project root, as they are for `dvc repro`
    states: dict[str, str] = {}
    try:
        cfg = load_config(params_file, overrides)
        stages.preflight(cfg)
        with workspace_lock(root):
            for call in stages.prepare_calls(cfg):
                _run(call, states)
            _fan_out(stages.compile_calls(cfg), states, cfg.execution)
            _fan_out(stages.benchmark_calls(cfg), states, cfg.execution)
            _fan_out(stages.latency_curve_calls(cfg), states, cfg.execution)
            report = _run(stages.report(cfg), states)
            # The human-facing report of this run (`edgeopt report` rebuilds it from metrics/).
            report_files = dashboard.write_report(
                catalog.report_dir(), dashboard.REPORTS / dashboard.run_name(), cfg.report.accuracy_budget
            )
            dvc_synced = not overrides and sync_dvc_lock(root)
            rows, compiled = report["rows"], report["compile_rows"]
            # Under the lock too: two runs creating the local MLflow store at once collide.
            tracked = log_pipeline(
                cfg, root, root / catalog.report_dir(), rows, states, compile_rows=compiled, report_files=report_files
            )
    except (_Stop, EdgeoptError) as exc:
        return Failed(name=USER_ERROR, message=str(exc))

    return {
        "stages": states,
        "rows": rows,
        "compile_rows": compiled,
        "seq_len_choice": report["seq_len_choice"],
        "report_files": [str(root / f) for f in report_files],
        "dvc_synced": dvc_synced,
        **tracked,
    }
