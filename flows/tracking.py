"""MLflow logging, in one place: one parent run per flow run, one child per benchmark row.

Default store: `sqlite:///mlflow.db` in the project (no server). `tracking.tracking_uri` in
params or `MLFLOW_TRACKING_URI` point it at a server instead. The client API with explicit
`mlflow.parentRunId` tags is used rather than the fluent `start_run`, whose nesting is
thread-local and silently makes children top-level runs in other threads.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pandas as pd

from tasks.config import EdgeoptConfig
from tasks.fingerprint import tool_versions

TRACKED_TOOLS = ("edgeopt", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-qnn", "openvino", "nncf",
                 "prefect", "dvc", "mlflow", "pandera")
ROW_METRICS = (
    "size_mb",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "latency_mean_ms",
    "latency_std_ms",
    "cold_start_ms",
    "stsb_spearman",
    "cosine_to_fp32_mean",
    "cosine_to_fp32_min",
    "spearman_drop",
)
ROW_PARAMS = ("model", "source_model", "variant", "device", "seq_len", "threads", "precision", "artifact", "artifact_sha256",
              "dvc_stage", "timed_runs", "stsb_pairs", "engine_version", "within_budget")
COMPILE_METRICS = ("size_mb", "npu_nodes", "cpu_fallback_nodes", "compile_s", "cached_compile_s",
                   "verify_min_cosine", "verify_run_ms_median")
COMPILE_PARAMS = ("model", "variant", "device", "target", "seq_len", "status", "precision", "artifact",
                  "cpu_fallback_op_types", "engine_versions", "dvc_stage")


def local_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def tracking_uri(cfg: EdgeoptConfig, root: Path) -> str:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_uri(root)


def _unreachable(uri: str) -> str | None:
    """Why an http(s) tracking server cannot be used, or None. Checked up front: MLflow's own
    client retries for minutes before giving up."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        return f"MLflow server {uri} unreachable ({exc.__class__.__name__})"
    return None


def _flatten(prefix: str, value, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = str(value)


def log_pipeline(
    cfg: EdgeoptConfig,
    root: Path,
    report_dir: Path,
    rows: list[dict],
    stage_states: dict[str, str],
    compile_rows: list[dict] = (),
) -> dict:
    """Log the run. A configured server that cannot be reached does not fail the pipeline: the run
    is logged to the local store instead and the returned `mlflow_fallback_reason` says so."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg, root)
    fallback_reason = _unreachable(uri)
    if fallback_reason:
        uri = local_uri(root)
        fallback_reason += f"; logged to {uri} instead"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(
            cfg.tracking.experiment,
            # A local store keeps artifacts beside it; a server decides for itself.
            artifact_location=(root / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite") else None,
        )
    )
    versions = {f"version.{k}": v for k, v in tool_versions(TRACKED_TOOLS).items()}
    machine = {"machine.cpu": platform.processor() or platform.machine(), "machine.cores": str(os.cpu_count())}
    now = int(time.time() * 1000)

    params: dict[str, str] = {}
    _flatten("", cfg.model_dump(mode="json"), params)
    parent = client.create_run(
        experiment_id,
        run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={**versions, **machine, **{f"stage.{k}": v for k, v in stage_states.items()}},
    )
    pid = parent.info.run_id
    client.log_batch(pid, params=[Param(k, v[:6000]) for k, v in sorted(params.items())])
    for name in ("benchmark.csv", "compile.csv", "summary.json"):
        if (report_dir / name).is_file():
            client.log_artifact(pid, str(report_dir / name))
    if (root / "params.yaml").is_file():
        client.log_artifact(pid, str(root / "params.yaml"))

    for row in rows:
        child = client.create_run(
            experiment_id,
            run_name=row["dvc_stage"],
            tags={"mlflow.parentRunId": pid, **versions, **machine},
        )
        client.log_batch(
            child.info.run_id,
            metrics=[Metric(m, float(row[m]), now, 0) for m in ROW_METRICS],
            params=[Param(p, str(row[p])) for p in ROW_PARAMS],
        )
        client.set_terminated(child.info.run_id)
    for row in compile_rows:
        child = client.create_run(
            experiment_id,
            run_name=row["dvc_stage"],
            # Simulator timings (QNN HTP on x86-64) are tagged so nobody reads them as device latency.
            tags={"mlflow.parentRunId": pid, "simulated": str(row["simulated"]), **versions, **machine},
        )
        values = {m: row[m] for m in COMPILE_METRICS if row.get(m) is not None and not pd.isna(row[m])}
        client.log_batch(
            child.info.run_id,
            metrics=[Metric(m, float(v), now, 0) for m, v in values.items()],
            params=[Param(p, str(row[p])[:6000]) for p in COMPILE_PARAMS],
        )
        client.set_terminated(child.info.run_id)
    client.set_terminated(pid)
    return {"mlflow_run_id": pid, "mlflow_tracking_uri": uri, "mlflow_fallback_reason": fallback_reason}
