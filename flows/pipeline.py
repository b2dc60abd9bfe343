"""The edgeopt Prefect flow, wiring only:
fetch → export → reference → calibration data → graph surgery → quantize → compile → benchmark → report."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.serializers import JSONSerializer

from flows import stages
from flows.caching import StageCachePolicy, results_dir
from flows.locking import workspace_lock
from flows.tracking import log_pipeline
from tasks import catalog
from tasks.config import load_config


@task(
    cache_policy=StageCachePolicy(),
    persist_result=True,
    result_serializer=JSONSerializer(),
    task_run_name="{call.name}",
)
def run_stage(call: stages.StageCall) -> dict:
    return call.execute()


def _run(call: stages.StageCall, states: dict[str, str]) -> dict:
    state = run_stage.with_options(result_storage=results_dir())(call=call, return_state=True)
    states[call.name] = state.name
    return state.result()


def sync_dvc_lock(root: Path) -> bool:
    """Record this run's outputs in dvc.lock so `dvc status` agrees that the pipeline is current."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return False
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.commit(force=True)
    return True


@flow(name="edgeopt-pipeline", log_prints=True)
def pipeline(project_dir: str = ".", params_file: str = "params.yaml") -> dict:
    root = Path(project_dir).resolve()
    os.chdir(root)  # stage paths are relative to the project root, as they are for `dvc repro`
    cfg = load_config(params_file)
    stages.preflight(cfg)
    states: dict[str, str] = {}

    with workspace_lock(root):
        _run(stages.fetch_model(cfg), states)
        for seq_len in cfg.seq_lens:
            _run(stages.export_onnx(cfg, seq_len), states)
            _run(stages.reference(cfg, seq_len), states)
        _run(stages.calibration_data(cfg), states)
        for seq_len in cfg.seq_lens:
            _run(stages.graph_surgery(cfg, seq_len), states)
            for variant in cfg.variants:
                _run(stages.quantize(cfg, variant, seq_len), states)
        # One at a time on purpose: compile and benchmark each need the whole machine.
        for call in stages.compile_calls(cfg):
            _run(call, states)
        for call in stages.benchmark_calls(cfg):
            _run(call, states)
        report = _run(stages.report(cfg), states)
        dvc_synced = sync_dvc_lock(root)

    rows, compiled = report["rows"], report["compile_rows"]
    tracked = log_pipeline(cfg, root, root / catalog.report_dir(), rows, states, compile_rows=compiled)
    return {"stages": states, "rows": rows, "compile_rows": compiled, "dvc_synced": dvc_synced, **tracked}
