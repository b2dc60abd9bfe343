"""The edgeopt Prefect flow, wiring only:
fetch → calibration data → per model and length: export → reference → graph surgery → quantize →
per-layer sensitivity (when asked) → quantize of auto_mixed variants → compile (fanned out over jobs) → benchmark (fanned out over targets) →
bundle (per target: its lengths as buckets, timed on the user's inputs) → race (every device's bundles timed side by side) → latency curve (extra lengths, when asked) → report → the HTML/Markdown report in reports/<run>/."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect.serializers import JSONSerializer
from prefect.states import Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows import dashboard, dvc_yaml, stages
from flows.caching import StageCachePolicy, results_dir
from flows.locking import workspace_lock
from flows.secrets import redact, redact_logs
from flows.tracking import check_uri, log_pipeline, prefect_links, start_run, summary_markdown, tracking_uri
from tasks.config import ExecutionParams, load_config
from tasks.core.catalog import MAIN, Catalog, run_catalog
from tasks.core.errors import ConfigError, EdgeoptError

# State name of a stage stopped by an error the user can fix (bad input, failed check): the flow
# ends Failed with that one-line message instead of a traceback. Other exceptions are bugs and
# keep their tracebacks.
USER_ERROR = "UserError"
DEFAULT_PARAMS = "params.yaml"


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
    result = state.result()  # re-raises a bug's exception with its traceback
    if state.name == "Completed" and stages.LINKED_FROM in result:
        states[call.name] = stages.LINKED
    return result


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


@contextlib.contextmanager
def fan_out_runner(execution: ExecutionParams) -> Iterator[TaskRunner]:
    """One task runner (one Dask cluster) for every fan-out of a flow run: starting a cluster takes seconds."""
    with task_runner(execution) as runner:
        client = getattr(runner, "client", None)
        if client is not None:  # Dask workers resolve the stages' project-relative paths from here
            client.run(os.chdir, os.getcwd())
        yield runner


def _fan_out(runner: TaskRunner, calls: list[stages.StageCall], states: dict[str, str]) -> list[dict]:
    """Run independent stage calls on the task runner (all finish before a failure stops the flow)."""
    if not calls:
        return []
    futures = runner.map(_stage_task(), parameters={"call": calls})
    wait(futures)
    return [_settle(call, future.state, states) for call, future in zip(calls, futures)]


def publish_summary(best: dict, mlflow_url: str, report: Path) -> None:
    """A Markdown artifact on the Prefect flow run: the best artifacts, and links to MLflow and the report."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(summary_markdown(best, mlflow_url, str(report)), key="edgeopt-summary",
                             description="fastest artifact within the accuracy budget per device and length")


def run_outputs(params_file: str, overrides: dict[str, Any] | None) -> Catalog:
    """Where a run writes: the project's tracked outputs (what dvc.lock describes) for params.yaml as it is;
    otherwise a run folder of its own, named after the params file and a hash of the overrides, so a run
    with the same settings finds its earlier outputs again."""
    if params_file == DEFAULT_PARAMS and not overrides:
        return MAIN
    name = Path(params_file).stem
    if overrides:
        name += "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    return run_catalog(name)


@flow(name="edgeopt-pipeline", log_prints=True)
def pipeline(project_dir: str = ".", params_file: str = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> dict:
    """Run the DAG in `project_dir`. A run of params.yaml as it is writes the tracked outputs and dvc.lock;
    one from another params file or with `overrides` (e.g. a deployment's) writes under runs/<name>/ only."""
    redact_logs()  # here, not in the CLI: deployments' flow runs log through the same handlers
    root = Path(project_dir).resolve()
    os.chdir(root)  # stage paths are relative to the project root, as they are for `dvc repro`
    states: dict[str, str] = {}
    started = time.monotonic()
    out = run_outputs(params_file, overrides)
    try:
        with stages.one_closure_per_stage():  # the code does not change during a run
            cfg = load_config(params_file, overrides)
            stages.preflight(cfg)
            check_uri(tracking_uri(cfg, root))
            if out.is_main:  # the run dvc.lock will describe: dvc.yaml must be the one params.yaml makes
                dvc_yaml.check(cfg, root)
            with workspace_lock(root):
                prepare, probes, compiles, benchmarks, bundles, race_call, curves, report_call = (
                    stages.prepare_calls(cfg, out),
                    [*stages.sensitivity_calls(cfg, out), *stages.mixed_quantize_calls(cfg, out)],
                    stages.compile_calls(cfg, out), stages.benchmark_calls(cfg, out), stages.bundle_calls(cfg, out),
                    stages.race(cfg, out), stages.latency_curve_calls(cfg, out), stages.report(cfg, out),
                )
                for call in [*prepare, *probes]:  # one at a time: the sensitivity probes use both cores
                    _run(call, states)
                with fan_out_runner(cfg.execution) as runner:
                    _fan_out(runner, compiles, states)
                    _fan_out(runner, benchmarks, states)
                    _fan_out(runner, bundles, states)
                    _fan_out(runner, curves, states)
                _run(race_call, states)  # alone: it times every device's bundles side by side
                report = _run(report_call, states)
                rows, compiled = report["rows"], report["compile_rows"]
                # Logged before the DVC sync, so a failing sync cannot lose the run; under the lock too: two runs
                # creating the local MLflow store at once collide. The parent run opens first: the report links it.
                tracked_run = start_run(cfg, root)
                prefect_url = prefect_links().get("prefect.flow_run_url")
                links = {"MLflow run": tracked_run.url, **({"Prefect flow run": prefect_url} if prefect_url else {})}
                report_files = dashboard.write_report(  # the human-facing report (`edgeopt report` rebuilds it)
                    out.report_dir(), out.reports_dir() / dashboard.run_name(), cfg.report.accuracy_budget, links=links,
                    plot_cache=root / dashboard.PLOT_CACHE,
                )
                tracked = log_pipeline(tracked_run, cfg, root, root / out.report_dir(), rows, states,
                                       time.monotonic() - started, compile_rows=compiled, report_files=report_files)
                publish_summary(report["best_within_budget"], tracked_run.url, root / report_files[0])
                get_run_logger().info("MLflow run %s (%s); report %s", tracked_run.url, redact(tracked_run.uri),
                                      root / report_files[0])
                dvc_synced = out.is_main and dvc_yaml.sync_lock(
                    root, [c.out_dir for c in (*prepare, *probes, *compiles, *benchmarks, *bundles, race_call, *curves, report_call)]
                )
    except (_Stop, EdgeoptError) as exc:
        return Failed(name=USER_ERROR, message=str(exc))

    return {
        "stages": states,
        "outputs": str(root / out.base),
        "rows": rows,
        "compile_rows": compiled,
        "seq_len_choice": report["seq_len_choice"],
        "report_files": [str(root / f) for f in report_files],
        "dvc_synced": dvc_synced,
        **tracked,
    }
