"""pandera schemas for every table that crosses a stage boundary."""

from __future__ import annotations

import pandera.pandas as pa

STSB_PAIRS = pa.DataFrameSchema(
    {
        "score": pa.Column(float, pa.Check.in_range(0.0, 5.0)),
        "sentence1": pa.Column(str, pa.Check.str_length(min_value=1)),
        "sentence2": pa.Column(str, pa.Check.str_length(min_value=1)),
    },
    strict=True,
    coerce=True,
    name="stsb_pairs",
)

BENCHMARK_ROWS = pa.DataFrameSchema(
    {
        "model": pa.Column(str),
        "source_model": pa.Column(str),
        "variant": pa.Column(str),
        "device": pa.Column(str),
        "seq_len": pa.Column(int, pa.Check.gt(0)),
        "artifact": pa.Column(str, pa.Check.str_length(min_value=1)),
        "artifact_sha256": pa.Column(str, pa.Check.str_length(64, 64)),
        "size_mb": pa.Column(float, pa.Check.gt(0)),
        "latency_p50_ms": pa.Column(float, pa.Check.gt(0)),
        "latency_p90_ms": pa.Column(float, pa.Check.gt(0)),
        "latency_p99_ms": pa.Column(float, pa.Check.gt(0)),
        "latency_mean_ms": pa.Column(float, pa.Check.gt(0)),
        "latency_std_ms": pa.Column(float, pa.Check.ge(0)),
        "timed_runs": pa.Column(int, pa.Check.ge(50)),
        "cold_start_ms": pa.Column(float, pa.Check.gt(0)),
        "threads": pa.Column(int, pa.Check.ge(1)),
        "precision": pa.Column(str),
        "stsb_pairs": pa.Column(int, pa.Check.gt(0)),
        "stsb_spearman": pa.Column(float, pa.Check.in_range(-100.0, 100.0)),
        "cosine_to_fp32_mean": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001)),
        "cosine_to_fp32_min": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001)),
        "engine_version": pa.Column(str),
        "dvc_stage": pa.Column(str),
    },
    checks=pa.Check(
        lambda df: ~df.duplicated(["model", "variant", "device", "seq_len"]),
        error="one row per (model, variant, device, seq_len)",
    ),
    strict=True,
    coerce=True,
    ordered=True,
    name="benchmark_rows",
)

# What the report adds to every row: the accuracy budget verdict against the dense model's fp32 at
# the same length, and the drop against the row's own model in fp32 (they differ for pruned models).
REPORT_ROWS = BENCHMARK_ROWS.add_columns(
    {
        "spearman_drop": pa.Column(float),
        "within_budget": pa.Column(bool),
        "drop_vs_own_fp32": pa.Column(float),
    }
)


def describe(exc: Exception) -> str:
    """One line for a pandera SchemaError/SchemaErrors: which column failed which check, on what value."""
    cases = getattr(exc, "failure_cases", None)
    if cases is not None and len(cases):
        first = cases.iloc[0]
        column = first.get("column", getattr(getattr(exc, "schema", None), "name", None))
        check = first.get("check", getattr(exc, "check", None))
        value = first.get("failure_case")
        value = value.item() if hasattr(value, "item") else value
        more = f" (+{len(cases) - 1} more)" if len(cases) > 1 else ""
        return f"column {column!r} fails {check} on {value!r}{more}"
    return str(exc).splitlines()[0]
