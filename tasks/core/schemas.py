"""pandera schemas for every table that crosses a stage boundary (and the one-line description of a failure)."""

from __future__ import annotations

from typing import Any

import pandera.pandas as pa

# Percentiles from fewer runs than this are too noisy to compare (p99 of 50 runs is the 2nd worst).
MIN_TIMED_RUNS = 50

# Text read from params' text sources (calibration, distillation, the deployment's inputs).
CALIBRATION_TEXT = pa.DataFrameSchema(
    {
        "sentence": pa.Column(
            str,
            [
                pa.Check.str_length(min_value=1),
                pa.Check(lambda s: s.str.strip().str.len() > 0, element_wise=False, error="all-whitespace sentence"),
            ],
            unique=True,
            nullable=False,
        ),
        "source": pa.Column(str, pa.Check.str_length(min_value=1)),
    },
    strict=False,
    coerce=True,
    name="calibration_text",
)

# Evaluation data, one schema per format (tasks.data.evaluation).
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
# A user's own pairs: any numeric gold score (Spearman only needs an order).
SENTENCE_PAIRS = pa.DataFrameSchema(
    {
        "score": pa.Column(float, pa.Check(lambda s: s.notna() & (s.abs() != float("inf")), error="finite score")),
        "sentence1": pa.Column(str, pa.Check.str_length(min_value=1)),
        "sentence2": pa.Column(str, pa.Check.str_length(min_value=1)),
    },
    strict=True,
    coerce=True,
    name="sentence_pairs",
)
LABELLED_TEXT = pa.DataFrameSchema(
    {
        "text": pa.Column(str, pa.Check.str_length(min_value=1)),
        "label": pa.Column(str, pa.Check.str_length(min_value=1)),
    },
    strict=True,
    coerce=True,
    name="labelled_text",
)
RETRIEVAL_QRELS = pa.DataFrameSchema(
    {
        "query_id": pa.Column(str, pa.Check.str_length(min_value=1)),
        "doc_id": pa.Column(str, pa.Check.str_length(min_value=1)),
        "relevance": pa.Column(float, pa.Check.ge(0)),
    },
    strict=True,
    coerce=True,
    name="retrieval_qrels",
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
        # The first configured evaluation set (metrics/evaluation.csv holds every set).
        "eval_set": pa.Column(str, pa.Check.str_length(min_value=1)),
        "metric_name": pa.Column(str, pa.Check.str_length(min_value=1)),
        "metric_value": pa.Column(float),
        "higher_is_better": pa.Column(bool),
        "eval_items": pa.Column(int, pa.Check.gt(0)),
        # Items in the whole set: more than eval_items when it was cut (max_items, quick mode).
        "eval_total_items": pa.Column(int, pa.Check.gt(0)),
        # Only where the metric is STS-B's Spearman x100: the name the results had before metric_name.
        "stsb_spearman": pa.Column(float, pa.Check.in_range(-100.0, 100.0), nullable=True),
        "cosine_to_fp32_mean": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001)),
        "cosine_to_fp32_min": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001)),
        "engine_version": pa.Column(str),
        "dvc_stage": pa.Column(str),
        # The compile job's target (e.g. snapdragon_8_gen_3) when a compiled artifact was measured,
        # `host` when the quantize output was measured as it is.
        "target": pa.Column(str, pa.Check.str_length(min_value=1)),
        # Latencies come from a simulator (QNN HTP on x86-64): never device latency.
        "simulated": pa.Column(bool),
        # Measured with `benchmark.quick` (few runs, an evaluation subset): for tests, never for decisions.
        "quick": pa.Column(bool),
        "timing_repeats": pa.Column(int, pa.Check.ge(1)),
        # (max - min) / median of the repeats' p50s, in %; empty with a single repeat.
        "latency_p50_spread_pct": pa.Column(float, pa.Check.ge(0), nullable=True),
        "latency_stable": pa.Column(bool),
        "throughput_per_s": pa.Column(float, pa.Check.gt(0)),
        "warm_start_ms": pa.Column(float, pa.Check.gt(0), nullable=True),
        "peak_rss_mb": pa.Column(float, pa.Check.gt(0)),
        # What the metric and cosine columns were computed from: this artifact on this device, or
        # (simulated devices) the identical QDQ graph on the ONNX Runtime CPU EP.
        "accuracy_source": pa.Column(str, pa.Check.isin(["artifact", "cpu_ep_same_graph"])),
        # A simulated context measured on a subset of the first evaluation set: its size and metric there.
        "sim_items": pa.Column("Int64", pa.Check.gt(0), nullable=True),
        "sim_metric_value": pa.Column(float, nullable=True),
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

# One row per compile job and sequence length, as the report stage writes it to metrics/compile.csv.
COMPILE_ROWS = pa.DataFrameSchema(
    {
        "model": pa.Column(str),
        "variant": pa.Column(str),
        "device": pa.Column(str),
        "target": pa.Column(str),
        "seq_len": pa.Column(int, pa.Check.gt(0)),
        "status": pa.Column(str, pa.Check.str_matches(r"^(compiled|skipped: .+)$")),
        "artifact": pa.Column(str, nullable=True),
        "size_mb": pa.Column(float, pa.Check.gt(0), nullable=True),
        "precision": pa.Column(str, nullable=True),
        "npu_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "cpu_fallback_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "cpu_fallback_op_types": pa.Column(str, nullable=True),
        "compile_s": pa.Column(float, pa.Check.ge(0), nullable=True),
        "cached_compile_s": pa.Column(float, pa.Check.ge(0), nullable=True),
        "verify_min_cosine": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001), nullable=True),
        "verify_run_ms_median": pa.Column(float, pa.Check.gt(0), nullable=True),
        "simulated": pa.Column(bool),
        "engine_versions": pa.Column(str, nullable=True),
        "dvc_stage": pa.Column(str),
    },
    checks=pa.Check(
        lambda df: ~df.duplicated(["model", "variant", "device", "target", "seq_len"]),
        error="one row per (model, variant, device, target, seq_len)",
    ),
    strict=True,
    coerce=True,
    ordered=True,
    name="compile_rows",
)


def compile_row(payload: dict) -> dict[str, Any]:
    """The COMPILE_ROWS row of one compile stage payload (skipped devices leave measurements empty)."""
    versions = payload.get("versions")
    fallback = payload.get("cpu_fallback_op_types")
    return {
        "model": payload["model"],
        "variant": payload["variant"],
        "device": payload["device"],
        "target": payload["target"],
        "seq_len": payload["seq_len"],
        "status": payload["status"],
        "artifact": payload.get("artifact"),
        "size_mb": payload.get("size_mb"),
        "precision": payload.get("precision"),
        "npu_nodes": payload.get("npu_nodes"),
        "cpu_fallback_nodes": payload.get("cpu_fallback_nodes"),
        "cpu_fallback_op_types": ", ".join(f"{op} x{n}" for op, n in fallback.items()) if fallback is not None else None,
        "compile_s": payload.get("compile_seconds"),
        "cached_compile_s": payload.get("cached_compile_seconds"),
        "verify_min_cosine": payload.get("verify_min_cosine"),
        "verify_run_ms_median": payload.get("verify_run_ms_median"),
        "simulated": bool(payload.get("simulated", False)),
        "engine_versions": ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else None,
        "dvc_stage": payload["dvc_stage"],
    }


# What the report adds to every row: the drop of the first evaluation set's metric against the dense
# model's fp32 at the same length (positive = worse, whatever the metric's direction), the budget verdict
# over every evaluation set, and the drop against the row's own model in fp32 (differs for pruned models).
REPORT_ROWS = BENCHMARK_ROWS.add_columns(
    {
        "metric_drop": pa.Column(float),
        "within_budget": pa.Column(bool),
        "drop_vs_own_fp32": pa.Column(float),
    }
)

# Every evaluation set's metric per benchmarked artifact (metrics/evaluation.csv), judged by the report.
EVALUATION_ROWS = pa.DataFrameSchema(
    {
        **{k: BENCHMARK_ROWS.columns[k] for k in ROW_KEY},
        "eval_set": pa.Column(str, pa.Check.str_length(min_value=1)),
        "metric_name": pa.Column(str, pa.Check.str_length(min_value=1)),
        "metric_value": pa.Column(float),
        "higher_is_better": pa.Column(bool),
        "items": pa.Column(int, pa.Check.gt(0)),
        "total_items": pa.Column(int, pa.Check.gt(0)),
        "accuracy_source": pa.Column(str, pa.Check.isin(["artifact", "cpu_ep_same_graph"])),
        "fp32_value": pa.Column(float),
        "drop": pa.Column(float),
        "own_fp32_value": pa.Column(float),
        "drop_vs_own_fp32": pa.Column(float),
        "within_budget": pa.Column(bool),
    },
    checks=pa.Check(lambda df: ~df.duplicated([*ROW_KEY, "eval_set"]), error="one row per artifact and eval_set"),
    strict=True,
    coerce=True,
    ordered=True,
    name="evaluation_rows",
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

# The prune stage's search walk, one row per level and evaluation set@length (report -> metrics/prune_search.csv).
PRUNE_SEARCH = pa.DataFrameSchema(
    {
        "model": pa.Column(str),
        "level": pa.Column(int, pa.Check.ge(1)),
        "head_ratio": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        "ffn_ratio": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        "channel_ratio": pa.Column(float, pa.Check.in_range(0.0, 1.0)),  # image classifiers: convolution channels
        "distill_steps": pa.Column(float, nullable=True),
        "encoder_weights_kept": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        "eval_set": pa.Column(str),
        "seq_len": pa.Column(int, pa.Check.gt(0)),
        "dense_value": pa.Column(float),
        "metric_value": pa.Column(float),
        "drop": pa.Column(float),
        "level_within_budget": pa.Column(bool),
        "chosen": pa.Column(bool),
    },
    strict=True,
    coerce=True,
    name="prune_search",
)

# Per-layer-group sensitivity of one quantized variant (stage sensitivity; report -> metrics/sensitivity.csv).
# axis: the two precisions a group is put at (float: quantized or float; a8: 8- or 16-bit activations);
# probe: `all` (every group at the lower one), `alone` (only this group), `kept` (every group but this one).
SENSITIVITY_ROWS = pa.DataFrameSchema(
    {
        "model": pa.Column(str),
        "variant": pa.Column(str),
        "seq_len": pa.Column(int, pa.Check.gt(0)),
        "group": pa.Column(str, pa.Check.str_length(min_value=1)),
        "axis": pa.Column(str, pa.Check.isin(["float", "a8"])),
        "probe": pa.Column(str, pa.Check.isin(["all", "alone", "kept"])),
        "layers": pa.Column(int, pa.Check.gt(0)),
        "macs": pa.Column(int, pa.Check.gt(0)),
        "eval_set": pa.Column(str, pa.Check.str_length(min_value=1)),
        "metric_name": pa.Column(str, pa.Check.str_length(min_value=1)),
        "eval_items": pa.Column(int, pa.Check.gt(0)),
        "fp32_metric": pa.Column(float),
        "all_lowered_metric": pa.Column(float),
        "metric_value": pa.Column(float),
        # metric_value - fp32_metric (negative: worse, for a higher-is-better metric)
        "metric_delta": pa.Column(float),
        "cosine_to_fp32": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001)),
        "seconds": pa.Column(float, pa.Check.ge(0)),
    },
    checks=pa.Check(lambda df: ~df.duplicated(["model", "variant", "seq_len", "group", "probe"]),
                    error="one row per (model, variant, seq_len, group, probe)"),
    strict=True,
    coerce=True,
    ordered=True,
    name="sensitivity_rows",
)

# Bundle rows (stage bundle, then the report): a target's artifacts deployed with one shape policy, timed on
# a sample of the user's inputs. `buckets` rows carry their own accuracy (routed as deployed); `static` rows get
# the benchmark's at their length in the report. Simulated rows have no latency.
BUNDLE_KEY = ["model", "variant", "device", "target", "policy", "shapes"]
BUCKETS, STATIC, DYNAMIC, PINNED = "buckets", "static", "dynamic", "pinned"
"""A bundle row's shape policy: routed to buckets, every input at one length, each at its own length, or one
dynamic artifact compiled at a few static lengths and routed to them."""

BUNDLE_ROWS = pa.DataFrameSchema(
    {
        "model": pa.Column(str),
        "variant": pa.Column(str),
        "device": pa.Column(str),
        "target": pa.Column(str),
        # As the engine reports it (a bf16 hint on a CPU without bf16 runs f32); none for simulated rows.
        "precision": pa.Column(str, nullable=True),
        "policy": pa.Column(str, pa.Check.isin([BUCKETS, STATIC, DYNAMIC, PINNED])),
        "shapes": pa.Column(str, pa.Check.str_matches(r"^(\d+(/\d+)*|<=\d+)$")),  # lengths, or dynamic up to one
        "contexts": pa.Column(int, pa.Check.ge(1)),
        "size_mb": pa.Column(float, pa.Check.gt(0)),
        "mix_inputs": pa.Column(int, pa.Check.ge(1)),
        "truncated_inputs": pa.Column(int, pa.Check.ge(0)),
        "bucket_counts": pa.Column(str),
        "latency_mix_mean_ms": pa.Column(float, pa.Check.gt(0), nullable=True),
        "latency_mix_p50_ms": pa.Column(float, pa.Check.gt(0), nullable=True),
        "latency_mix_p99_ms": pa.Column(float, pa.Check.gt(0), nullable=True),
        "metric_name": pa.Column(str, nullable=True),
        "metric_value": pa.Column(float, nullable=True),
        "cosine_to_fp32_mean": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001), nullable=True),
        "accuracy_source": pa.Column(str, nullable=True),
        "eval_truncated_inputs": pa.Column(float, pa.Check.ge(0), nullable=True),
        "threads": pa.Column(int, pa.Check.ge(1)),
        "simulated": pa.Column(bool),
        "cpu_model": pa.Column(str),
        "cpu_flags": pa.Column(str, nullable=True),
        "engine_version": pa.Column(str),
        "tool_versions": pa.Column(str),
    },
    checks=[pa.Check(lambda df: ~df.duplicated(BUNDLE_KEY), error="one row per bundle and shape policy")],
    strict=True,
    coerce=True,
    name="bundle_rows",
)
# The report adds each row's verdict: drop against the dense fp32 with the same policy and shapes (buckets) or
# the benchmark row at its length (static), and the share of the user's inputs kept whole.
BUNDLE_VERDICT_ROWS = BUNDLE_ROWS.add_columns({
    "metric_drop": pa.Column(float, nullable=True),
    "within_budget": pa.Column(bool),
    "covered_share": pa.Column(float, pa.Check.in_range(0, 1)),
    "compile_s": pa.Column(float, pa.Check.ge(0), nullable=True),
})
# Then the race's timings of the row (stage race: every row of its device timed side by side; none when not raced).
BUNDLE_REPORT_ROWS = BUNDLE_VERDICT_ROWS.add_columns({
    "race_mean_ms": pa.Column(float, pa.Check.gt(0), nullable=True),
    "race_p99_ms": pa.Column(float, pa.Check.gt(0), nullable=True),
})


PEER_ROWS = pa.DataFrameSchema(
    {
        "artifact": pa.Column(str, unique=True),
        "kind": pa.Column(str, pa.Check.isin(["edgeopt", "peer"])),
        "tool": pa.Column(str),
        "int8": pa.Column(bool),
        "precision": pa.Column(str),
        "device": pa.Column(str),
        "latency_mean_ms": pa.Column(float, pa.Check.gt(0)),
        "latency_p50_ms": pa.Column(float, pa.Check.gt(0)),
        "latency_p99_ms": pa.Column(float, pa.Check.gt(0)),
        "rounds": pa.Column(int, pa.Check.ge(1)),
        "threads": pa.Column(int, pa.Check.ge(1)),
        "engine_version": pa.Column(str),
        "cpu_model": pa.Column(str),
        "cpu_flags": pa.Column(str),
        "speedup_vs_fastest_int8_peer": pa.Column(float, nullable=True),
        "fastest_int8_peer": pa.Column(str, nullable=True),
        "speedup_vs_same_engine_int8_peer": pa.Column(float, nullable=True),
        "fastest_int8_peer_same_engine": pa.Column(str, nullable=True),
    },
    strict=False,  # plus one metric column per evaluation set (<set>_<metric>)
    name="peer comparison rows",
)
