"""pandera schemas for every table that crosses a stage boundary."""

from __future__ import annotations

import pandera.pandas as pa

# Percentiles from fewer runs than this are too noisy to compare (p99 of 50 runs is the 2nd worst).
MIN_TIMED_RUNS = 50

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
        # >= 50 except on a simulator (seconds per run) and in quick mode: see the frame check below.
        "timed_runs": pa.Column(int, pa.Check.ge(1)),
        "cold_start_ms": pa.Column(float, pa.Check.gt(0)),
        "threads": pa.Column(int, pa.Check.ge(1)),
        "precision": pa.Column(str),
        "stsb_pairs": pa.Column(int, pa.Check.gt(0)),
        "stsb_spearman": pa.Column(float, pa.Check.in_range(-100.0, 100.0)),
        "cosine_to_fp32_mean": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001)),
        "cosine_to_fp32_min": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001)),
        "engine_version": pa.Column(str),
        "dvc_stage": pa.Column(str),
        # The compile job's target (e.g. snapdragon_8_gen_3) when a compiled artifact was measured,
        # `host` when the quantize output was measured as it is.
        "target": pa.Column(str, pa.Check.str_length(min_value=1)),
        # Latencies come from a simulator (QNN HTP on x86-64): never device latency.
        "simulated": pa.Column(bool),
        # Measured with `benchmark.quick` (few runs, an STS-B subset): for tests, never for decisions.
        "quick": pa.Column(bool),
        "timing_repeats": pa.Column(int, pa.Check.ge(1)),
        # (max - min) / median of the repeats' p50s, in %; empty with a single repeat.
        "latency_p50_spread_pct": pa.Column(float, pa.Check.ge(0), nullable=True),
        "latency_stable": pa.Column(bool),
        "throughput_per_s": pa.Column(float, pa.Check.gt(0)),
        "warm_start_ms": pa.Column(float, pa.Check.gt(0), nullable=True),
        "peak_rss_mb": pa.Column(float, pa.Check.gt(0)),
        # What the STS-B and cosine columns were computed from: this artifact on this device, or
        # (simulated devices) the identical QDQ graph on the ONNX Runtime CPU EP.
        "accuracy_source": pa.Column(str, pa.Check.isin(["artifact", "cpu_ep_same_graph"])),
        "sim_pairs": pa.Column("Int64", pa.Check.gt(0), nullable=True),
        "sim_stsb_spearman": pa.Column(float, pa.Check.in_range(-100.0, 100.0), nullable=True),
        "sim_cosine_to_cpu_ep_mean": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001), nullable=True),
        "sim_cosine_to_cpu_ep_min": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001), nullable=True),
        "cpu_model": pa.Column(str),
        "cpu_flags": pa.Column(str, nullable=True),
        "tool_versions": pa.Column(str),
    },
    checks=[
        pa.Check(
            lambda df: ~df.duplicated(["model", "variant", "device", "target", "seq_len"]),
            error="one row per (model, variant, device, target, seq_len)",
        ),
        pa.Check(
            lambda df: (df["timed_runs"] >= MIN_TIMED_RUNS) | df["simulated"] | df["quick"],
            error=f"timed_runs >= {MIN_TIMED_RUNS} unless simulated or quick",
        ),
    ],
    strict=True,
    coerce=True,
    ordered=True,
    name="benchmark_rows",
)
ROW_KEY = ["model", "variant", "device", "target", "seq_len"]

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
