"""Stage report: collect benchmark rows into the results contract.

Reads: the `stage.json` of each benchmark output named in the config. Writes: `<out>/benchmark.csv`
(validated by `tasks.schemas.BENCHMARK_ROWS`), `<out>/summary.json` (DVC metrics) and
`<out>/stage.json`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.errors

from tasks.errors import StageError
from tasks.fingerprint import atomic_output_dir, read_stamp, write_json_atomic, write_stamp
from tasks.schemas import BENCHMARK_ROWS, describe

TOOLS = ("pandas", "pandera")
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


def run(benchmark_dirs: list[Path], out_dir: Path, key: str) -> dict:
    table = collect_rows(benchmark_dirs)
    summary = {
        f"{r.variant}/{r.device}/{r.seq_len}": {m: float(getattr(r, m)) for m in SUMMARY_METRICS}
        for r in table.itertuples()
    }
    with atomic_output_dir(out_dir) as scratch:
        table.to_csv(scratch / "benchmark.csv", index=False, float_format="%.6g")
        write_json_atomic(scratch / "summary.json", summary)
        write_stamp(scratch, key, {"rows": len(table)})
    return {"rows": table.to_dict(orient="records"), "summary": summary}
