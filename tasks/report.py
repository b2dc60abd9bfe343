"""Stage report: collect benchmark rows into the results contract, judge the accuracy budget and
choose a sequence length per device.

Reads: the `stage.json` of each benchmark, compile and latency_curve output named in the config, the
tokenizer of the fetched model and the text the seq-len choice is about (`report.seq_len_choice.text`).
Writes: `<out>/benchmark.csv` (validated by `REPORT_TABLE`: every benchmark row plus `spearman_drop`
and `within_budget` against the fp32 row at the same sequence length, and the compile columns
`npu_nodes, cpu_fallback_nodes, compile_s` of the compile job that built the measured artifact),
`<out>/compile.csv` (`tasks.compile.COMPILE_ROWS`: every compile job, skipped ones included),
`<out>/latency_curve.csv` (latency at the extra lengths), `<out>/seq_len_choice.csv` (per device and
candidate length: share of inputs truncated, latency; `tasks.seq_len_choice`), `<out>/summary.json`
(DVC metrics, the fastest within-budget row per device and length, the recommended length per
device), `<out>/input_lengths.json` (percentiles of the input token counts and the share truncated
along a grid of lengths) and `<out>/stage.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pandera.errors
import pandera.pandas as pa
from pydantic import BaseModel, ConfigDict, Field

from tasks import seq_len_choice
from tasks.catalog import DENSE
from tasks.compile import COMPILE_ROWS, compile_row
from tasks.errors import StageError
from tasks.fingerprint import atomic_output_dir, read_stamp, write_json_atomic, write_stamp
from tasks.schemas import BENCHMARK_ROWS, REPORT_ROWS, ROW_KEY, describe
from tasks.seq_len_choice import LatencyCurveParams, SeqLenChoiceParams

TOOLS = ("pandas", "pandera", "transformers", "tokenizers")


class ReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    accuracy_budget: float = Field(
        0.5, ge=0, description="max STS-B Spearman points below fp32 (same seq_len) for a row to be within budget"
    )
    seq_len_choice: SeqLenChoiceParams = SeqLenChoiceParams()
    latency_curve: LatencyCurveParams = LatencyCurveParams()


# The compile job that built a benchmarked artifact, if any: its placement and compile time.
REPORT_TABLE = REPORT_ROWS.add_columns(
    {
        "npu_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "cpu_fallback_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "compile_s": pa.Column(float, pa.Check.ge(0), nullable=True),
    }
)
COMPILE_COLUMNS = ("npu_nodes", "cpu_fallback_nodes", "compile_s")
SUMMARY_METRICS = ("latency_p50_ms", "latency_p99_ms", "cold_start_ms", "size_mb", "stsb_spearman", "cosine_to_fp32_min")
CURVE_COLUMNS = ["model", "variant", "device", "target", "seq_len", "threads", "latency_p50_ms", "latency_p90_ms",
                 "latency_p99_ms", "latency_mean_ms", "latency_std_ms", "timed_runs", "timing_repeats",
                 "latency_p50_spread_pct", "latency_stable", "size_mb", "precision", "engine_version", "measured_by"]


def _stamps(folders: list[Path], stage: str) -> list[dict]:
    stamps = []
    for folder in folders:
        stamp = read_stamp(folder)
        if not stamp or "rows" not in stamp:
            raise StageError(f"{folder}: no finished {stage} (stage.json missing); run its {stage} stage first")
        stamps.append(stamp)
    return stamps


def collect_rows(benchmark_dirs: list[Path]) -> pd.DataFrame:
    rows = [row for stamp in _stamps(benchmark_dirs, "benchmark") for row in stamp["rows"]]
    try:
        return BENCHMARK_ROWS.validate(pd.DataFrame(rows, columns=list(BENCHMARK_ROWS.columns)))
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        raise StageError(f"benchmark rows fail the schema: {describe(exc)}") from exc


def collect_compile_rows(compile_dirs: list[Path]) -> pd.DataFrame:
    rows = []
    for folder in compile_dirs:
        stamp = read_stamp(folder)
        if not stamp or "status" not in stamp:
            raise StageError(f"{folder}: no finished compile (stage.json missing); run its compile stage first")
        row = compile_row(stamp)
        if row["artifact"]:
            row["artifact"] = (Path(folder) / row["artifact"]).as_posix()
        rows.append(row)
    try:
        return COMPILE_ROWS.validate(pd.DataFrame(rows, columns=list(COMPILE_ROWS.columns)))
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        raise StageError(f"compile rows fail the schema: {describe(exc)}") from exc


def collect_curve(curve_dirs: list[Path]) -> pd.DataFrame:
    rows = [row for stamp in _stamps(curve_dirs, "latency_curve") for row in stamp["rows"]]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def add_compile_columns(table: pd.DataFrame, compiled: pd.DataFrame) -> pd.DataFrame:
    """Join each benchmark row with the compile job that built its artifact (same key, target included)."""
    done = compiled[compiled["status"] == "compiled"][[*ROW_KEY, *COMPILE_COLUMNS]]
    return REPORT_TABLE.validate(table.merge(done, on=ROW_KEY, how="left"))


def judge_budget(table: pd.DataFrame, budget: float) -> pd.DataFrame:
    """Add spearman_drop (the dense model's fp32 minus this row, same seq_len), within_budget
    (drop <= budget) and drop_vs_own_fp32 (the same against this row's own model in fp32, which is
    the dense fp32 for dense rows and e.g. the pruned fp32 for pruned rows)."""
    fp32 = table[(table["variant"] == "fp32") & ~table["simulated"]].sort_values("device", key=lambda d: d != "ort_cpu")
    baselines = fp32.drop_duplicates(["model", "seq_len"]).set_index(["model", "seq_len"])["stsb_spearman"]
    own = pd.MultiIndex.from_frame(table[["model", "seq_len"]])
    dense = pd.MultiIndex.from_arrays([[DENSE] * len(table), table["seq_len"]])
    missing = sorted({f"{m}@{s}" for m, s in [*own, *dense] if (m, s) not in baselines.index})
    if missing:
        raise StageError(
            f"no fp32 row for {missing}: add {{variant: fp32, device: ort_cpu}} to targets "
            "(the accuracy budget is measured against it)"
        )
    drop = baselines.reindex(dense).to_numpy() - table["stsb_spearman"].to_numpy()
    own_drop = baselines.reindex(own).to_numpy() - table["stsb_spearman"].to_numpy()
    return REPORT_ROWS.validate(
        table.assign(spearman_drop=drop, within_budget=drop <= budget, drop_vs_own_fp32=own_drop)
    )


def best_within_budget(table: pd.DataFrame) -> dict:
    """Fastest row within budget for each (device, seq_len), over every model: what to deploy there.
    Rows timed on a simulator are left out: simulator time says nothing about which is faster."""
    best = {}
    ok = table[table["within_budget"] & ~table["simulated"]].sort_values("latency_p50_ms")
    for r in ok.drop_duplicates(["device", "seq_len"]).itertuples():
        best[f"{r.device}/{r.seq_len}"] = {
            "model": r.model,
            "variant": r.variant,
            "latency_p50_ms": float(r.latency_p50_ms),
            "stsb_spearman": float(r.stsb_spearman),
            "artifact": r.artifact,
            "target": r.target,
        }
    return best


def run(
    benchmark_dirs: list[Path],
    params: ReportParams,
    out_dir: Path,
    key: str,
    model_dir: Path,
    text: Path,
    compile_dirs: list[Path] = (),
    curve_dirs: list[Path] = (),
) -> dict:
    """`model_dir`: the HF folder whose tokenizer counts input tokens; `text`: the file named by
    `params.seq_len_choice.text` (passed separately so the caller hashes its content)."""
    from transformers import AutoTokenizer

    compiled = collect_compile_rows(list(compile_dirs))
    table = add_compile_columns(judge_budget(collect_rows(benchmark_dirs), params.accuracy_budget), compiled)
    curve = collect_curve(list(curve_dirs))
    source = params.seq_len_choice.text.model_copy(update={"path": Path(text)})
    lengths = seq_len_choice.input_lengths(AutoTokenizer.from_pretrained(model_dir), source)
    choice_table, choices = seq_len_choice.choose(
        lengths, seq_len_choice.latency_by_length(table, curve), params.seq_len_choice.coverage
    )
    summary = {
        f"{r.model}/{r.variant}/{r.device}/{r.target}/{r.seq_len}": {m: float(getattr(r, m)) for m in SUMMARY_METRICS}
        for r in table.itertuples()
    }
    best = best_within_budget(table)
    candidates = sorted({int(x) for x in table["seq_len"]} | {int(x) for x in curve["seq_len"]})
    stats = seq_len_choice.length_stats(lengths, candidates)
    seq_len = {"coverage": params.seq_len_choice.coverage,
               "inputs": {k: v for k, v in stats.items() if k != "truncated_share"}, "choice": choices}
    with atomic_output_dir(out_dir) as scratch:
        table.to_csv(scratch / "benchmark.csv", index=False, float_format="%.6g")
        compiled.to_csv(scratch / "compile.csv", index=False, float_format="%.6g")
        curve.to_csv(scratch / "latency_curve.csv", index=False, float_format="%.6g")
        choice_table.to_csv(scratch / "seq_len_choice.csv", index=False, float_format="%.6g")
        write_json_atomic(scratch / "summary.json", {**summary, "best_within_budget": best, "seq_len_choice": seq_len})
        write_json_atomic(scratch / "input_lengths.json", stats)
        write_stamp(scratch, key, {"rows": len(table), "compile_rows": len(compiled), "curve_rows": len(curve)})
    return {
        # Through JSON so missing values are None (the Prefect result is stored as JSON).
        "rows": json.loads(table.to_json(orient="records")),
        "compile_rows": json.loads(compiled.to_json(orient="records")),
        "curve_rows": json.loads(curve.to_json(orient="records")),
        "summary": summary,
        "best_within_budget": best,
        "seq_len_choice": seq_len,
    }
