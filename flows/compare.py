"""`edgeopt compare RUN_A RUN_B`: benchmark metrics of two pipeline runs side by side, from MLflow.

Each pipeline run is an MLflow parent run whose benchmark rows are child runs (flows/tracking.py);
rows are matched on (model, variant, device, target, seq_len). Runs logged before rows had a
compile target count as target `host`.
"""

from __future__ import annotations

from tasks.errors import InputError

Key = tuple[str, str, str, str, int]


def benchmark_children(uri: str, run_id: str) -> dict[Key, dict[str, float]]:
    """Metrics of the benchmark child runs of parent run `run_id`, by row key."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        parent = client.get_run(run_id)
    except MlflowException as exc:
        raise InputError(f"MLflow run {run_id!r} not found in {uri}; pass a parent run id (`edgeopt ui` lists them)") from exc
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=10_000
    )
    rows = {}
    for child in children:
        p = child.data.params
        if "latency_p50_ms" not in child.data.metrics or not {"variant", "device", "seq_len"} <= set(p):
            continue  # compile jobs and anything else that is not a benchmark row
        key = (p.get("model", "dense"), p["variant"], p["device"], p.get("target", "host"), int(p["seq_len"]))
        rows[key] = dict(child.data.metrics)
    if not rows:
        raise InputError(f"MLflow run {run_id} has no benchmark child runs; pass the id of a pipeline (parent) run")
    return rows


def deltas(
    a: dict[Key, dict[str, float]], b: dict[Key, dict[str, float]], metrics: list[str]
) -> tuple[list[tuple[Key, dict[str, tuple[float | None, float | None]]]], list[Key], list[Key]]:
    """For each row in both runs, (value in A, value in B) per metric; and the rows only in A / only in B."""
    both = sorted(set(a) & set(b))
    table = [(k, {m: (a[k].get(m), b[k].get(m)) for m in metrics}) for k in both]
    return table, sorted(set(a) - set(b)), sorted(set(b) - set(a))
