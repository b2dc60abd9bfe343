"""MLflow logging, in one place: one parent run per flow run, one child per benchmark row and per
compile job, and each device's best within-budget artifact registered in the model registry.

Default store: `sqlite:///mlflow.db` in the project (no server). `tracking.tracking_uri` in
params or `MLFLOW_TRACKING_URI` point it at a server instead. The client API with explicit
`mlflow.parentRunId` tags is used rather than the fluent `start_run`, whose nesting is
thread-local and silently makes children top-level runs in other threads.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
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
# Measured only for some rows (warm start with an engine cache, simulator agreement, ...): logged when present.
OPTIONAL_ROW_METRICS = ("latency_p50_spread_pct", "warm_start_ms", "throughput_per_s", "peak_rss_mb",
                        "sim_stsb_spearman", "sim_cosine_to_cpu_ep_min")
ROW_PARAMS = ("model", "source_model", "variant", "device", "target", "seq_len", "threads", "precision", "artifact",
              "artifact_sha256", "dvc_stage", "timed_runs", "timing_repeats", "stsb_pairs", "accuracy_source",
              "engine_version", "within_budget", "simulated", "quick", "cpu_model", "cpu_flags", "tool_versions")
COMPILE_METRICS = ("size_mb", "npu_nodes", "cpu_fallback_nodes", "compile_s", "cached_compile_s",
                   "verify_min_cosine", "verify_run_ms_median")
# Tags of a registered model version: what it is and how it measured.
REGISTERED_TAGS = ("model", "variant", "device", "seq_len", "artifact", "artifact_sha256", "latency_p50_ms",
                   "stsb_spearman", "spearman_drop", "dvc_stage")
COMPILE_PARAMS = ("model", "variant", "device", "target", "seq_len", "status", "precision", "artifact",
                  "cpu_fallback_op_types", "engine_versions", "dvc_stage")


# `user:password@` in a URI: kept out of params, tags and messages (credentials belong in
# MLFLOW_TRACKING_USERNAME/PASSWORD or the store's own environment variables).
_URI_PASSWORD = re.compile(r"(?<=://)([^/:@\s]+):[^/@\s]+@")


def redact(text: str) -> str:
    return _URI_PASSWORD.sub(r"\1:***@", text)


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
        return f"MLflow server {redact(uri)} unreachable ({exc.__class__.__name__})"
    return None


def _flatten(prefix: str, value, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = redact(str(value))


def _prefect_tags() -> dict[str, str]:
    """Which Prefect flow run (and deployment) this MLflow run belongs to, when run by Prefect."""
    from prefect.runtime import deployment, flow_run

    tags = {"prefect.flow_run_id": flow_run.id, "prefect.deployment": deployment.name}
    return {k: str(v) for k, v in tags.items() if v}


def registered_model_name(cfg: EdgeoptConfig, device: str, seq_len: int) -> str:
    return f"{cfg.tracking.experiment}-{device}-seq{seq_len}"


def _log_model_files(client, run_id: str, artifact: Path) -> str:
    """Log the deployable artifact under `model/` of the run; return its format.

    ONNX goes through MLflow's onnx flavor (MLmodel, signature, loadable with `mlflow.onnx` or
    pyfunc). MLflow has no OpenVINO flavor, and the IR's consumers are device runtimes that take the
    files as they are, so `model.xml` goes in with the files sharing its stem (`model.bin`)."""
    if artifact.suffix == ".onnx":
        import mlflow.onnx
        import onnx

        requirements = [f"{k}=={v}" for k, v in tool_versions(("onnx", "onnxruntime")).items()]
        with tempfile.TemporaryDirectory() as tmp:
            # Explicit requirements: MLflow's inference spawns an interpreter and takes seconds.
            mlflow.onnx.save_model(onnx.load(str(artifact)), f"{tmp}/model", pip_requirements=requirements)
            client.log_artifacts(run_id, f"{tmp}/model", "model")
        return "onnx"
    for path in sorted(artifact.parent.glob(f"{artifact.stem}.*")):
        client.log_artifact(run_id, str(path), "model")
    return "openvino_ir" if artifact.suffix == ".xml" else artifact.suffix.lstrip(".")


def _row_key(row: dict) -> tuple:
    """What identifies a benchmark row (metrics/benchmark.csv is unique on it)."""
    return row["model"], row["variant"], row["device"], row["target"], row["seq_len"]


def register_best(
    client, cfg: EdgeoptConfig, root: Path, best: dict[str, dict], rows: list[dict], row_runs: dict[tuple, str]
) -> dict[str, str]:
    """Register each `best_within_budget` entry (fastest within-budget row per device and length) as a
    version of the registered model `<experiment>-<device>-seq<L>`, linked to that row's child run.
    When the latest version already holds the same artifact (sha256) nothing is added, so a cached
    rerun does not grow the registry. Returns "device/L" -> "name/version"."""
    from mlflow.exceptions import MlflowException

    by_key = {_row_key(r): r for r in rows}
    registered = {}
    for key, entry in sorted(best.items()):
        device, seq_len = key.rsplit("/", 1)
        row = by_key[(entry["model"], entry["variant"], device, entry["target"], int(seq_len))]
        name = registered_model_name(cfg, device, row["seq_len"])
        try:
            client.create_registered_model(name, description=f"fastest {device} artifact within the accuracy budget "
                                                             f"at {seq_len} tokens (edgeopt report)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        versions = client.search_model_versions(f"name='{name}'")
        latest = max(versions, key=lambda v: int(v.version), default=None)
        if latest is not None and latest.tags.get("artifact_sha256") == row["artifact_sha256"]:
            registered[key] = f"{name}/{latest.version}"
            continue
        run_id = row_runs[_row_key(row)]
        tags = {k: str(row[k]) for k in REGISTERED_TAGS}
        tags["format"] = _log_model_files(client, run_id, root / row["artifact"])
        version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags)
        registered[key] = f"{name}/{version.version}"
    return registered


def log_pipeline(
    cfg: EdgeoptConfig,
    root: Path,
    report_dir: Path,
    rows: list[dict],
    stage_states: dict[str, str],
    compile_rows: list[dict] = (),
    report_files: list[Path] = (),
) -> dict:
    """Log the run and register the best artifacts. A configured server that cannot be reached does
    not fail the pipeline: the run is logged to the local store instead and the returned
    `mlflow_fallback_reason` says so."""
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
        tags={**versions, **machine, **_prefect_tags(), **{f"stage.{k}": v for k, v in stage_states.items()}},
    )
    pid = parent.info.run_id
    client.log_batch(pid, params=[Param(k, v[:6000]) for k, v in sorted(params.items())])
    for name in ("benchmark.csv", "compile.csv", "summary.json", "latency_curve.csv", "seq_len_choice.csv",
                 "input_lengths.json"):
        if (report_dir / name).is_file():
            client.log_artifact(pid, str(report_dir / name))
    if (root / "params.yaml").is_file():
        client.log_artifact(pid, str(root / "params.yaml"))
    for path in report_files:  # the HTML/Markdown report of this run
        client.log_artifact(pid, str(path), "report")

    row_runs = {}
    for row in rows:
        child = client.create_run(
            experiment_id,
            run_name=row["dvc_stage"] + ("" if row["target"] == "host" else f"/{row['target']}"),
            # Simulator timings (QNN HTP on x86-64) are tagged so nobody reads them as device latency.
            tags={"mlflow.parentRunId": pid, "simulated": str(row["simulated"]), **versions, **machine},
        )
        row_runs[_row_key(row)] = child.info.run_id
        optional = [m for m in OPTIONAL_ROW_METRICS if row.get(m) is not None and not pd.isna(row[m])]
        client.log_batch(
            child.info.run_id,
            metrics=[Metric(m, float(row[m]), now, 0) for m in (*ROW_METRICS, *optional)],
            params=[Param(p, str(row[p])[:6000]) for p in ROW_PARAMS],
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
    summary = report_dir / "summary.json"
    best = json.loads(summary.read_text(encoding="utf-8")).get("best_within_budget", {}) if summary.is_file() else {}
    registered = register_best(client, cfg, root, best, rows, row_runs)
    for key, version in registered.items():
        client.set_tag(pid, f"registered.{key}", version)
    client.set_terminated(pid)
    return {
        "mlflow_run_id": pid,
        "mlflow_tracking_uri": redact(uri),
        "mlflow_fallback_reason": fallback_reason,
        "mlflow_registered": registered,
    }
