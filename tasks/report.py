"""Stage report: collect benchmark rows into the results contract and judge the accuracy budget.

Reads: the `stage.json` of each benchmark and compile output named in the config. Writes:
`<out>/benchmark.csv` (validated by `REPORT_TABLE`: every benchmark row plus `spearman_drop` and
`within_budget` against the fp32 row at the same sequence length, and the compile columns
`npu_nodes, cpu_fallback_nodes, compile_s, simulated` where a compile job built that variant for that
device), `<out>/compile.csv` (`tasks.compile.COMPILE_ROWS`: every compile job, skipped ones included),
`<out>/summary.json` (DVC metrics, and the fastest within-budget row per device and length) and
`<out>/stage.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pandera.errors
import pandera.pandas as pa
from pydantic import BaseModel, ConfigDict, Field

from tasks.catalog import DENSE
from tasks.errors import StageError
from tasks.fingerprint import atomic_output_dir, read_stamp, write_json_atomic, write_stamp
from tasks.compile import COMPILE_ROWS, compile_row
from tasks.schemas import BENCHMARK_ROWS, REPORT_ROWS, describe

TOOLS = ("pandas", "pandera")


class ReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    accuracy_budget: float = Field(
        0.5, ge=0, description="max STS-B Spearman points below fp32 (same seq_len) for a row to be within budget"
    )
# The compile job that built a benchmarked (variant, device, seq_len), if any: its placement and timing.
REPORT_TABLE = REPORT_ROWS.add_columns(
    {
        "npu_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "cpu_fallback_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "compile_s": pa.Column(float, pa.Check.ge(0), nullable=True),
        "simulated": pa.Column(bool),
    }
)
COMPILE_COLUMNS = ("npu_nodes", "cpu_fallback_nodes", "compile_s", "simulated")
SUMMARY_METRICS = ("latency_p50_ms", "latency_p99_ms", "cold_start_ms", "size_mb", "stsb_spearman", "cosine_to_fp32_min")


def collect_rows(benchmark_dirs: list[Path]) -> pd.DataFrame:
    rows = []
    for folder in benchmark_dirs:
        stamp = read_stamp(folder)
        if not stamp or "row" not in stamp:
            raise StageError(f"{folder}: no finished benchmark (stage.json missing); run its benchmark stage first")
        rows.append(stamp["row"])
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


def add_compile_columns(table: pd.DataFrame, compiled: pd.DataFrame) -> pd.DataFrame:
    """Join each benchmark row with the compile job of the same model, variant, device and length."""
    keys = ["model", "variant", "device", "seq_len"]
    done = compiled[compiled["status"] == "compiled"].drop_duplicates(keys)
    done = done[[*keys, *COMPILE_COLUMNS]]
    merged = table.merge(done, on=keys, how="left")
    merged["simulated"] = merged["simulated"].astype("boolean").fillna(False).astype(bool)
    return REPORT_TABLE.validate(merged)


def judge_budget(table: pd.DataFrame, budget: float) -> pd.DataFrame:
    """Add spearman_drop (the dense model's fp32 minus this row, same seq_len), within_budget
    (drop <= budget) and drop_vs_own_fp32 (the same against this row's own model in fp32, which is
    the dense fp32 for dense rows and e.g. the pruned fp32 for pruned rows)."""
    fp32 = table[table["variant"] == "fp32"].sort_values("device", key=lambda d: d != "ort_cpu")
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
    """Fastest row within budget for each (device, seq_len), over every model: what to deploy there."""
    best = {}
    ok = table[table["within_budget"]].sort_values("latency_p50_ms")
    for r in ok.drop_duplicates(["device", "seq_len"]).itertuples():
        best[f"{r.device}/{r.seq_len}"] = {
            "model": r.model,
            "variant": r.variant,
            "latency_p50_ms": float(r.latency_p50_ms),
            "stsb_spearman": float(r.stsb_spearman),
            "artifact": r.artifact,
        }
    return best


def run(
    benchmark_dirs: list[Path], params: ReportParams, out_dir: Path, key: str, compile_dirs: list[Path] = ()
) -> dict:
    compiled = collect_compile_rows(list(compile_dirs))
    table = add_compile_columns(judge_budget(collect_rows(benchmark_dirs), params.accuracy_budget), compiled)
    summary = {
        f"{r.model}/{r.variant}/{r.device}/{r.seq_len}": {m: float(getattr(r, m)) for m in SUMMARY_METRICS}
        for r in table.itertuples()
    }
    best = best_within_budget(table)
    with atomic_output_dir(out_dir) as scratch:
        table.to_csv(scratch / "benchmark.csv", index=False, float_format="%.6g")
        compiled.to_csv(scratch / "compile.csv", index=False, float_format="%.6g")
        write_json_atomic(scratch / "summary.json", {**summary, "best_within_budget": best})
        write_stamp(scratch, key, {"rows": len(table), "compile_rows": len(compiled)})
    return {
        # Through JSON so missing values are None (the Prefect result is stored as JSON).
        "rows": json.loads(table.to_json(orient="records")),
        "compile_rows": json.loads(compiled.to_json(orient="records")),
        "summary": summary,
        "best_within_budget": best,
    }
