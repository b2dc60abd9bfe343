"""`edgeopt compare RUN_A RUN_B`: what differs between two pipeline runs, from MLflow.

First the settings that differ (the runs' `config.json` artifacts, flattened), then each benchmarked
artifact's metrics, B against A, judged against noise: a latency change smaller than the larger of the two
rows' measured p50 spread (their repeats' p50s, max - min, % of the median) is "within noise", not better or
worse. Rows are matched on (model, variant, device, target, seq_len).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from flows.secrets import redact
from flows.tracking import compare_url, open_store, unreachable
from tasks.core.errors import InputError

Key = tuple[str, str, str, str, int]
# (metric, lower is better, noisy: judged against the rows' p50 spread)
COMPARED = (
    ("latency_p50_ms", True, True),
    ("latency_p99_ms", True, True),
    ("cold_start_ms", True, True),
    ("size_mb", True, False),
    ("metric_value", False, False),
    ("cosine_to_fp32_min", False, False),
)
SAME = 1e-9


@dataclass(frozen=True)
class Change:
    row: str
    metric: str
    a: float | None
    b: float | None
    change_pct: float | None
    verdict: str
    """better, worse, within noise (±N %), same, or only in A / only in B."""


def _client(uri: str):
    reason = unreachable(uri)
    if reason:
        raise InputError(f"{reason}; start it (`edgeopt services start mlflow`) or point MLFLOW_TRACKING_URI elsewhere")
    return open_store(uri)


def _parent(client, uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise InputError(
            f"MLflow run {run_id!r} not found in {redact(uri)}; pass a parent run id (`edgeopt ui` lists them)"
        ) from exc


def settings(client, run) -> dict[str, str]:
    """The run's whole config (its config.json artifact), else the params it logged."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run.info.run_id, "config.json", tmp)
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 (older runs have no config.json: their params are the settings)
            return dict(run.data.params)


def benchmark_children(client, run) -> dict[Key, dict[str, float]]:
    """Metrics of the benchmark child runs of a parent run, by row key."""
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'", max_results=10_000
    )
    rows = {}
    for child in children:
        p = child.data.params
        if "latency_p50_ms" not in child.data.metrics or not {"variant", "device", "seq_len"} <= set(p):
            continue  # compile jobs and anything else that is not a benchmark row
        key = (p.get("model", "dense"), p["variant"], p["device"], p.get("target", "host"), int(p["seq_len"]))
        rows[key] = dict(child.data.metrics)
    if not rows:
        raise InputError(f"MLflow run {run.info.run_id} has no benchmark child runs; pass the id of a pipeline (parent) run")
    return rows


def param_diff(a: dict[str, str], b: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _name(key: Key) -> str:
    model, variant, device, target, seq_len = key
    return f"{model}/{variant}/{device}" + ("" if target == "host" else f"@{target}") + f"/{seq_len}"


def judge(metric: str, lower_is_better: bool, noisy: bool, a: dict[str, float], b: dict[str, float]) -> tuple:
    va, vb = a.get(metric), b.get(metric)
    if va is None or vb is None:
        return va, vb, None, "not measured in both"
    delta = vb - va
    pct = delta / va * 100 if va else None
    if abs(delta) <= SAME * max(1.0, abs(va)):
        return va, vb, pct, "same"
    if noisy:
        band = max(a.get("latency_p50_spread_pct", 0.0), b.get("latency_p50_spread_pct", 0.0))
        if pct is not None and abs(pct) <= band:
            return va, vb, pct, f"within noise (±{band:.1f} %)"
    return va, vb, pct, "better" if (delta < 0) == lower_is_better else "worse"


def compare(uri: str, run_a: str, run_b: str) -> dict:
    """The params that differ and every metric change (B - A) of the rows in both runs."""
    client = _client(uri)
    parent_a, parent_b = _parent(client, uri, run_a), _parent(client, uri, run_b)
    rows_a, rows_b = benchmark_children(client, parent_a), benchmark_children(client, parent_b)
    changes = []
    for key in sorted(set(rows_a) & set(rows_b)):
        for metric, lower, noisy in COMPARED:
            changes.append(Change(_name(key), metric, *judge(metric, lower, noisy, rows_a[key], rows_b[key])))
    return {
        "tracking_uri": redact(uri),
        "compare_url": compare_url(uri, parent_a.info.experiment_id, [run_a, run_b]),
        "a": {"run_id": run_a, "name": parent_a.info.run_name},
        "b": {"run_id": run_b, "name": parent_b.info.run_name},
        "params": [{"param": k, "a": va, "b": vb} for k, va, vb in param_diff(settings(client, parent_a),
                                                                             settings(client, parent_b))],
        "changes": [asdict(c) for c in changes],
        "only_in_a": [_name(k) for k in sorted(set(rows_a) - set(rows_b))],
        "only_in_b": [_name(k) for k in sorted(set(rows_b) - set(rows_a))],
    }
