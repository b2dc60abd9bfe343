"""Stage report: collect benchmark rows into the results contract, judge the accuracy budget on every
evaluation set and choose a sequence length per device.

Reads: the `stage.json` of each benchmark, compile, bundle and latency_curve output named in the config and of
the race (its side-by-side timings rank the bundle rows for `shape_choice`), the model folder's preprocessor and the text the seq-len choice is about (`report.seq_len_choice.text`).
Writes: `<out>/benchmark.csv` (`REPORT_TABLE`: every benchmark row plus `metric_drop` and
`within_budget` against the dense model's fp32 row at the same sequence length, and the compile columns
`npu_nodes, cpu_fallback_nodes, compile_s` of the compile job that built the measured artifact),
`<out>/evaluation.csv` (`EVALUATION_ROWS`: every evaluation set's metric per row and its own verdict),
`<out>/compile.csv` (`COMPILE_ROWS`: every compile job, skipped ones included), `<out>/bundles.csv`
(`BUNDLE_REPORT_ROWS`: every bundle row, its verdict and its race timings), `<out>/latency_curve.csv`
(latency at the extra lengths), `<out>/sensitivity.csv` (`SENSITIVITY_ROWS`: every sensitivity stage's probes),
`<out>/auto_mixed.json` (the layer groups each auto_mixed variant keeps float, and its measured loss),
`<out>/prune_search.csv` (`PRUNE_SEARCH`: each searched model's levels
tried, their scores and drops per evaluation set and length, and the one kept), `<out>/seq_len_choice.csv`
(per device and candidate length: share of inputs truncated, latency), `<out>/summary.json` (DVC metrics, the fastest within-budget row per device
and length, the recommended length per device), `<out>/input_lengths.json` (percentiles of the input
token counts and the share truncated along a grid of lengths) and `<out>/stage.json`.

The budget: a row is within budget when, on every evaluation set, the metric is at most
`accuracy_budget` points worse than the dense model's fp32 at the same length (worse in the metric's
own direction).

Sequence-length choice.
NPUs need static shapes, so every artifact is built for one length L, and an input longer than L is
truncated. Given the user's text (`report.seq_len_choice.text`) and the latency measured per
device and length (the benchmark rows at the deployed lengths plus the `latency_curve` rows at extra
ones), for each device and compile target:
- every measured length gets the share of inputs it would truncate and the p50 latency of the
  fastest artifact within the accuracy budget there (at a length with no accuracy measurement, the
  latency-curve length, that is the variant picked at the nearest deployed length);
- the recommended length is the smallest measured one that keeps at least `coverage` of the inputs
  whole (default 99 %); if none does, the longest measured one, said so in the reason.
On a simulator the latencies are simulator times (marked); the choice there rests on coverage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.errors
import pandera.pandas as pa
from pydantic import Field

from tasks.core.catalog import AUTO_MIXED, DENSE, SENSITIVITY_TABLE
from tasks.core.errors import StageError
from tasks.core.fingerprint import atomic_output_dir, finished_compile, read_stamp, write_json_atomic, write_stamp
from tasks.core.params import StrictParams
from tasks.core.schemas import (
    DYNAMIC,
    PINNED,
    STATIC,
    BENCHMARK_ROWS,
    BUNDLE_KEY,
    BUNDLE_REPORT_ROWS,
    BUNDLE_ROWS,
    BUNDLE_VERDICT_ROWS,
    COMPILE_ROWS,
    EVALUATION_ROWS,
    PRUNE_SEARCH,
    REPORT_ROWS,
    ROW_KEY,
    SENSITIVITY_ROWS,
    compile_row,
    describe,
)
from tasks.data.text import TextSource, distinct_texts
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings

TOOLS = ("pandas", "pandera", "transformers", "tokenizers")
EVALUATION_COLUMNS = ["eval_set", "metric_name", "metric_value", "higher_is_better", "items", "total_items",
                      "accuracy_source"]

GRID_POINTS = 64  # points on the report's truncation curve
CHOICE_COLUMNS = ["device", "target", "seq_len", "truncated_share", "covered_share", "model", "variant",
                  "latency_p50_ms", "measured_by", "simulated", "chosen"]


class SeqLenChoiceParams(StrictParams):
    coverage: float = Field(0.99, gt=0, le=1, description="share of inputs the chosen length must keep whole")
    text: TextSource = Field(
        TextSource(path=Path("artifacts/calibration_data/text_pool.csv"), format="csv", column="sentence"),
        description="the inputs the deployed model will see (default: the calibration pool)",
    )


def input_lengths(impl, preprocessor, source: TextSource) -> np.ndarray:
    """Tokens per unique non-blank input of `source`, special tokens included (what L must hold)."""
    texts = distinct_texts(source, Path(source.path), "text for the seq-len choice", "report.seq_len_choice.text")
    return impl.input_lengths(preprocessor, texts)


def _nearest(lengths: list[int], L: int) -> int:
    """The deployed length closest to L (ties: the longer one, which truncates less)."""
    return min(lengths, key=lambda d: (abs(d - L), -d))


def latency_by_length(table: pd.DataFrame, curve: pd.DataFrame) -> pd.DataFrame:
    """Per (device, target, seq_len): the fastest within-budget row at deployed lengths, and the same
    variant's latency-curve time at the extra lengths."""
    picks = []
    ok = table[table["within_budget"]].sort_values("latency_p50_ms")
    deployed = ok.drop_duplicates(["device", "target", "seq_len"])
    for r in deployed.itertuples():
        picks.append({"device": r.device, "target": r.target, "seq_len": int(r.seq_len), "model": r.model,
                      "variant": r.variant, "latency_p50_ms": float(r.latency_p50_ms),
                      "measured_by": "benchmark", "simulated": bool(r.simulated)})
    for (device, target), group in deployed.groupby(["device", "target"]):
        lengths = sorted(int(x) for x in group["seq_len"])
        for L in sorted(set(int(x) for x in curve.get("seq_len", [])) - set(lengths)):
            base = group[group["seq_len"] == _nearest(lengths, L)].iloc[0]
            hit = curve[(curve["model"] == base["model"]) & (curve["variant"] == base["variant"])
                        & (curve["device"] == device) & (curve["seq_len"] == L)]
            if len(hit):
                picks.append({"device": device, "target": target, "seq_len": L, "model": base["model"],
                              "variant": base["variant"], "latency_p50_ms": float(hit["latency_p50_ms"].iloc[0]),
                              "measured_by": "latency_curve", "simulated": bool(base["simulated"])})
    return pd.DataFrame(picks, columns=["device", "target", "seq_len", "model", "variant", "latency_p50_ms",
                                        "measured_by", "simulated"])


def choose(lengths: np.ndarray, latency: pd.DataFrame, coverage: float, unit: str = "tokens") -> tuple[pd.DataFrame, dict]:
    """The candidate table (CHOICE_COLUMNS) and, per "device/target", the recommended length and why (a shape
    in `unit`, the family's `shape_unit`)."""
    frames, choices = [], {}
    for (device, target), group in latency.groupby(["device", "target"], sort=True):
        group = group.sort_values("seq_len").copy()
        group["truncated_share"] = [float((lengths > L).mean()) for L in group["seq_len"]]
        group["covered_share"] = 1 - group["truncated_share"]
        fits = group[group["covered_share"] >= coverage]
        pick = fits.iloc[0] if len(fits) else group.iloc[-1]
        group["chosen"] = group["seq_len"] == pick["seq_len"]
        frames.append(group)
        longest = group.iloc[-1]
        sim = " (simulated)" if pick["simulated"] else ""
        kept = f"{int(pick['seq_len'])} {unit} keep {pick['covered_share']:.1%} of {len(lengths)} inputs whole"
        fit = (f"{kept} (target {coverage:.1%})" if len(fits) else
               f"{kept}, short of the {coverage:.1%} target: the longest length measured; measure longer lengths")
        which = f"{pick['model']}/{pick['variant']}"
        if pick["measured_by"] == "benchmark":
            which += " is the fastest within the accuracy budget there"
        else:
            nearest = _nearest(sorted(int(x) for x in group.loc[group["measured_by"] == "benchmark", "seq_len"]),
                               int(pick["seq_len"]))
            which += (f" is the fastest within the accuracy budget at {nearest} {unit} (accuracy is measured at "
                      f"deployed lengths), timed at {int(pick['seq_len'])} by the latency curve")
        speedup = float(longest["latency_p50_ms"]) / float(pick["latency_p50_ms"])
        cost = "" if longest["seq_len"] == pick["seq_len"] else (
            f", {speedup:.1f}x faster than at {int(longest['seq_len'])} {unit} ({float(longest['latency_p50_ms']):.2f} ms)")
        choices[f"{device}/{target}"] = {
            "seq_len": int(pick["seq_len"]),
            "covered_share": float(pick["covered_share"]),
            "model": pick["model"],
            "variant": pick["variant"],
            "latency_p50_ms": float(pick["latency_p50_ms"]),
            "measured_by": pick["measured_by"],
            "simulated": bool(pick["simulated"]),
            "longest_seq_len": int(longest["seq_len"]),
            "speedup_vs_longest": speedup,
            "reason": f"{fit}. {which}: p50 {float(pick['latency_p50_ms']):.2f} ms{sim}{cost}.",
        }
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CHOICE_COLUMNS)
    return table[CHOICE_COLUMNS], choices


def length_stats(lengths: np.ndarray, candidates: list[int]) -> dict:
    """Percentiles of the input lengths and the share truncated along a grid up to the longest input or
    candidate (what the report plots), candidates included."""
    top = max(int(lengths.max()), *candidates)
    grid = sorted({*np.linspace(1, top, GRID_POINTS).astype(int).tolist(), *candidates})
    return {"inputs": int(len(lengths)), "max": int(lengths.max()),
            **{f"p{p}": float(np.percentile(lengths, p)) for p in (50, 90, 99)},
            "truncated_share": {str(L): float((lengths > L).mean()) for L in grid}}


class ReportParams(StrictParams):
    accuracy_budget: float = Field(
        0.5, ge=0, description="max metric points below the dense fp32 (same seq_len) on every evaluation set"
    )
    seq_len_choice: SeqLenChoiceParams = SeqLenChoiceParams()
    max_bundle_mb: float | None = Field(
        None, gt=0, description="recommend no bundle (buckets) larger than this; null = no cap"
    )


# The compile job that built a benchmarked artifact, if any: its placement and compile time.
REPORT_TABLE = REPORT_ROWS.add_columns(
    {
        "npu_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "cpu_fallback_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "compile_s": pa.Column(float, pa.Check.ge(0), nullable=True),
    }
)
COMPILE_COLUMNS = ("npu_nodes", "cpu_fallback_nodes", "compile_s")
SUMMARY_METRICS = ("latency_p50_ms", "latency_p99_ms", "cold_start_ms", "size_mb", "metric_value", "cosine_to_fp32_min")
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


def collect_rows(benchmark_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The benchmark rows and every evaluation set's metric per row (unjudged)."""
    stamps = _stamps(benchmark_dirs, "benchmark")
    rows = [row for stamp in stamps for row in stamp["rows"]]
    scores = [score for stamp in stamps for score in stamp.get("evaluations", [])]
    try:
        table = BENCHMARK_ROWS.validate(pd.DataFrame(rows, columns=list(BENCHMARK_ROWS.columns)))
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        raise StageError(f"benchmark rows fail the schema: {describe(exc)}") from exc
    return table, pd.DataFrame(scores, columns=[*ROW_KEY, *EVALUATION_COLUMNS])


def collect_compile_rows(compile_dirs: list[Path]) -> pd.DataFrame:
    rows = []
    for folder in compile_dirs:
        row = compile_row(finished_compile(folder))
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


def collect_sensitivity(sensitivity_dirs: list[Path]) -> tuple[pd.DataFrame, list[dict]]:
    """Every sensitivity stage's table, one frame (`SENSITIVITY_ROWS`), and the auto_mixed assignments they chose."""
    frames, assignments = [], []
    for folder in sensitivity_dirs:
        table, stamp = Path(folder) / SENSITIVITY_TABLE, read_stamp(folder)
        if not stamp or not table.is_file():
            raise StageError(f"{folder}: no finished sensitivity (stage.json missing); run its sensitivity stage first")
        try:
            frames.append(SENSITIVITY_ROWS.validate(pd.read_csv(table), lazy=False))
        except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
            raise StageError(f"{table}: {describe(exc)}; rerun its sensitivity stage") from exc
        assignments += [{"model": stamp["model"], "seq_len": stamp["seq_len"], **a}
                        for a in stamp.get("assignments", {}).values()]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SENSITIVITY_ROWS.columns))
    return frame, assignments


def collect_prune_search(prune_dirs: list[Path]) -> tuple[pd.DataFrame, dict]:
    """The walk of every model whose strength was searched (long: level x set@length) and, per model,
    whether a level held the budget and which."""
    rows, verdicts = [], {}
    for folder in prune_dirs:
        stamp = read_stamp(folder)
        if not stamp or "model" not in stamp:
            raise StageError(f"{folder}: no finished prune (stage.json missing); run its prune stage first")
        search = stamp.get("search")
        if not search:
            continue
        chosen = search["chosen"]
        verdicts[stamp["model"]] = {"met_budget": search["met_budget"],
                                    "chosen": search["levels"][chosen] if chosen is not None else None,
                                    "levels_tried": len(search["levels"])}
        for i, level in enumerate(search["levels"]):
            for where, value in level["scores"].items():
                eval_set, seq_len = where.rsplit("@", 1)
                rows.append({
                    "model": stamp["model"], "level": i + 1, "head_ratio": level["head_ratio"],
                    "ffn_ratio": level["ffn_ratio"], "channel_ratio": level.get("channel_ratio", 0.0),
                    "distill_steps": level["distill_steps"],
                    "encoder_weights_kept": level["encoder_weights_kept"], "eval_set": eval_set,
                    "seq_len": int(seq_len), "dense_value": search["dense"][where], "metric_value": value,
                    "drop": level["drops"][where], "level_within_budget": level["within_budget"], "chosen": i == chosen,
                })
    try:
        return PRUNE_SEARCH.validate(pd.DataFrame(rows, columns=list(PRUNE_SEARCH.columns))), verdicts
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        raise StageError(f"prune search rows fail the schema: {describe(exc)}") from exc


def add_compile_columns(table: pd.DataFrame, compiled: pd.DataFrame) -> pd.DataFrame:
    """Join each benchmark row with the compile job that built its artifact (same key, target included)."""
    done = compiled[compiled["status"] == "compiled"][[*ROW_KEY, *COMPILE_COLUMNS]]
    return REPORT_TABLE.validate(table.merge(done, on=ROW_KEY, how="left"))


def judge(scores: pd.DataFrame, budget: float) -> pd.DataFrame:
    """Every evaluation set's metric per row against the dense model's fp32 at the same length (`drop`,
    positive = worse in the metric's direction; `within_budget`: drop <= budget) and against the row's own
    model in fp32 (`drop_vs_own_fp32`). Simulated rows' fp32 is never a baseline."""
    base = scores[(scores["variant"] == "fp32") & (scores["accuracy_source"] == "artifact")]
    base = base.sort_values("device", key=lambda d: d != "ort_cpu").drop_duplicates(["model", "seq_len", "eval_set"])
    values = base.set_index(["model", "seq_len", "eval_set"])["metric_value"]
    own = pd.MultiIndex.from_frame(scores[["model", "seq_len", "eval_set"]])
    dense = pd.MultiIndex.from_arrays([[DENSE] * len(scores), scores["seq_len"], scores["eval_set"]])
    missing = sorted({f"{m}@{s}" for m, s, e in [*own, *dense] if (m, s, e) not in values.index})
    if missing:
        raise StageError(
            f"no fp32 row for {missing}: add {{variant: fp32, device: ort_cpu}} to targets "
            "(the accuracy budget is measured against it)"
        )
    sign = np.where(scores["higher_is_better"].astype(bool), 1.0, -1.0)
    fp32, own_fp32 = values.reindex(dense).to_numpy(), values.reindex(own).to_numpy()
    drop = sign * (fp32 - scores["metric_value"].to_numpy())
    return EVALUATION_ROWS.validate(scores.assign(
        fp32_value=fp32, drop=drop, own_fp32_value=own_fp32,
        drop_vs_own_fp32=sign * (own_fp32 - scores["metric_value"].to_numpy()), within_budget=drop <= budget,
    ))


def judge_budget(table: pd.DataFrame, judged: pd.DataFrame) -> pd.DataFrame:
    """Each row's first-set drops (`metric_drop`, `drop_vs_own_fp32`) and its verdict over every set."""
    per_row = judged.groupby(ROW_KEY, sort=False)["within_budget"].all().rename("within_budget")
    first = judged.drop_duplicates(ROW_KEY).set_index(ROW_KEY)[["drop", "drop_vs_own_fp32"]]
    merged = table.join(first.rename(columns={"drop": "metric_drop"}), on=ROW_KEY).join(per_row, on=ROW_KEY)
    return REPORT_ROWS.validate(merged[list(REPORT_ROWS.columns)])


def collect_bundles(bundle_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The bundle rows and every evaluation set's metric of each buckets row."""
    stamps = _stamps(bundle_dirs, "bundle")
    rows = [row for stamp in stamps for row in stamp["rows"]]
    try:
        table = BUNDLE_ROWS.validate(pd.DataFrame(rows, columns=list(BUNDLE_ROWS.columns)))
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        raise StageError(f"bundle rows fail the schema: {describe(exc)}") from exc
    scores = pd.DataFrame([s for stamp in stamps for s in stamp.get("evaluations", [])],
                          columns=["model", "variant", "device", "target", "policy", *EVALUATION_COLUMNS])
    return table, scores


def judge_bundles(bundles: pd.DataFrame, scores: pd.DataFrame, table: pd.DataFrame, budget: float,
                  benchmark_scores: pd.DataFrame) -> pd.DataFrame:
    """Each bundle row's verdict. Buckets rows: on every evaluation set, at most `budget` points worse than the
    dense fp32 bundle on ORT CPU with the same buckets (routed alike). Dynamic rows (each input at its own
    length up to L) and pinned rows (padded to pinned lengths up to L): against the dense fp32 at static L, which
    sees the same tokens (padding is masked out).
    Static rows: the benchmark row's verdict at that length. `covered_share`: the user's inputs the row keeps
    whole."""
    routed_rows = bundles[bundles["policy"] != STATIC]
    shapes = routed_rows.set_index(["model", "variant", "device", "target", "policy"])["shapes"]
    scores = scores.join(shapes, on=["model", "variant", "device", "target", "policy"])
    # A pinned row runs the dynamic artifact padded to a pinned length: the same tokens as at its own length.
    judged_at = np.where(scores["policy"] == PINNED, "<=" + scores["shapes"].str.rsplit("/", n=1).str[-1], scores["shapes"])
    scores = scores.assign(judged_at=judged_at)
    base = scores[(scores["model"] == DENSE) & (scores["variant"] == "fp32") & (scores["device"] == "ort_cpu")]
    static_fp32 = benchmark_scores[(benchmark_scores["model"] == DENSE) & (benchmark_scores["variant"] == "fp32")
                                   & (benchmark_scores["device"] == "ort_cpu")]
    base = pd.concat([base, static_fp32.assign(shapes="<=" + static_fp32["seq_len"].astype(int).astype(str))])
    fp32 = base.drop_duplicates(["shapes", "eval_set"]).set_index(["shapes", "eval_set"])["metric_value"]
    sign = np.where(scores["higher_is_better"].astype(bool), 1.0, -1.0)
    scores = scores.assign(drop=sign * (fp32.reindex(pd.MultiIndex.from_frame(scores[["judged_at", "eval_set"]])).to_numpy()
                                        - scores["metric_value"].to_numpy()))
    key = ["model", "variant", "device", "target", "policy", "shapes"]
    routed = scores.groupby(key).agg(metric_drop=("drop", "first"), within_budget=("drop", lambda d: bool((d <= budget).all())))
    static = table.assign(policy="static", shapes=table["seq_len"].astype(int).astype(str)).set_index(key)[
        ["metric_drop", "within_budget", "metric_name", "metric_value", "cosine_to_fp32_mean", "accuracy_source"]]
    judged = bundles.join(routed, on=key)
    for column in static.columns:  # static rows: the benchmark's accuracy at their length
        from_static = static[column].reindex(pd.MultiIndex.from_frame(judged[key])).to_numpy()
        judged[column] = np.where(judged["policy"] == STATIC, from_static, judged.get(column))
    judged["within_budget"] = judged["within_budget"].fillna(False).astype(bool)
    judged["covered_share"] = 1 - judged["truncated_inputs"] / judged["mix_inputs"]
    # What its buckets cost to build: the compile jobs of its lengths (none for quantize outputs run as they are).
    built = table.set_index(ROW_KEY)["compile_s"]
    judged["compile_s"] = [
        built.reindex([(r.model, r.variant, r.device, r.target, int(s)) for s in r.shapes.removeprefix("<=").split("/")]).sum(min_count=1)
        for r in judged.itertuples()]
    return BUNDLE_VERDICT_ROWS.validate(judged[list(BUNDLE_VERDICT_ROWS.columns)])


def add_race(bundles: pd.DataFrame, race_dir: Path | None) -> pd.DataFrame:
    """The bundle rows with the race's side-by-side timings (`race_mean_ms`, `race_p99_ms`; none for rows it did
    not time: simulated ones, or all of them without a race)."""
    stamp = read_stamp(race_dir) if race_dir else None
    raced = pd.DataFrame((stamp or {}).get("rows", []), columns=[*BUNDLE_KEY, "race_mean_ms", "race_p99_ms"])
    joined = bundles.join(raced.astype({"shapes": str}).set_index(BUNDLE_KEY)[["race_mean_ms", "race_p99_ms"]],
                          on=BUNDLE_KEY)
    return BUNDLE_REPORT_ROWS.validate(joined[list(BUNDLE_REPORT_ROWS.columns)])


def choose_shapes(bundles: pd.DataFrame, coverage: float, max_mb: float | None = None) -> dict:
    """Per device and compile target: the bundle row fastest on the user's inputs among those within budget that
    keep `coverage` of them whole (and no larger than `max_mb`), against the fastest such static row, with the
    reason in one line. Ranked on the race's timings (every row of the device timed side by side) where it has
    them, else on each bundle stage's own."""
    choices = {}
    timed = bundles[~bundles["simulated"] & bundles["within_budget"] & (bundles["covered_share"] >= coverage)
                    & ((bundles["size_mb"] <= max_mb) if max_mb else True)]
    raced = "race_mean_ms" in timed and timed["race_mean_ms"].notna().all()
    mean, p99 = ("race_mean_ms", "race_p99_ms") if raced else ("latency_mix_mean_ms", "latency_mix_p99_ms")
    for (device, target), group in timed.groupby(["device", "target"]):
        ranked = group.sort_values(mean)
        best, static = ranked.iloc[0], ranked[ranked["policy"] == STATIC]
        pick = {"policy": best["policy"], "shapes": best["shapes"], "model": best["model"], "variant": best["variant"],
                "latency_mix_mean_ms": float(best[mean]), "latency_mix_p99_ms": float(best[p99]),
                "timed_by": "race" if raced else "bundle"}
        if best["policy"] == STATIC or static.empty:
            pick["reason"] = (f"{best['policy']} {best['shapes']}: fastest on your inputs within budget, keeping "
                              f"{best['covered_share']:.1%} of them whole")
        else:
            other = static.iloc[0]
            speedup = float(other[mean]) / float(best[mean])
            cost = (f"one artifact, {best['size_mb'] - other['size_mb']:+.0f} MB" if best["policy"] == DYNAMIC else
                    f"one artifact compiled at {int(best['contexts'])} lengths when loaded, "
                    f"{best['size_mb'] - other['size_mb']:+.0f} MB" if best["policy"] == PINNED else
                    f"+{int(best['contexts']) - 1} artifacts, +{best['size_mb'] - other['size_mb']:.0f} MB")
            pick["reason"] = (f"{best['policy']} {best['shapes']}: {speedup:.2f}x faster on your inputs than static "
                              f"{other['shapes']} ({other['model']} {other['variant']}); {cost}")
            pick["vs_static"] = {"shapes": other["shapes"], "model": other["model"], "variant": other["variant"],
                                 "latency_mix_mean_ms": float(other[mean]), "speedup": speedup}
        choices[f"{device}/{target}"] = pick
    return choices


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
            "metric_name": r.metric_name,
            "metric_value": float(r.metric_value),
            "artifact": r.artifact,
            "target": r.target,
        }
    return best


def run(
    benchmark_dirs: list[Path],
    params: ReportParams,
    family: FamilySettings,
    out_dir: Path,
    key: str,
    model_dir: Path,
    text: Path,
    compile_dirs: list[Path] = (),
    curve_dirs: list[Path] = (),
    bundle_dirs: list[Path] = (),
    race_dir: Path | None = None,
    prune_dirs: list[Path] = (),
    sensitivity_dirs: list[Path] = (),
) -> dict:
    """`model_dir`: the model folder whose preprocessor measures input lengths; `text`: the file named by
    `params.seq_len_choice.text` (passed separately so the caller hashes its content)."""
    impl = FAMILIES.get(family.name)
    compiled = collect_compile_rows(list(compile_dirs))
    rows, scores = collect_rows(benchmark_dirs)
    judged = judge(scores, params.accuracy_budget)
    table = add_compile_columns(judge_budget(rows, judged), compiled)
    curve = collect_curve(list(curve_dirs))
    bundles = add_race(judge_bundles(*collect_bundles(list(bundle_dirs)), table, params.accuracy_budget, scores),
                       race_dir)
    shape_choice = choose_shapes(bundles, params.seq_len_choice.coverage, params.max_bundle_mb)
    searched, prune_verdicts = collect_prune_search(list(prune_dirs))
    sensitivity, assignments = collect_sensitivity(list(sensitivity_dirs))
    source = params.seq_len_choice.text.model_copy(update={"path": Path(text)})
    lengths = input_lengths(impl, impl.load_preprocessor(Path(model_dir)), source)
    choice_table, choices = choose(lengths, latency_by_length(table, curve), params.seq_len_choice.coverage,
                                   impl.shape_unit)
    summary = {
        f"{r.model}/{r.variant}/{r.device}/{r.target}/{r.seq_len}": {m: float(getattr(r, m)) for m in SUMMARY_METRICS}
        for r in table.itertuples()
    }
    best = best_within_budget(table)
    candidates = sorted({int(x) for x in table["seq_len"]} | {int(x) for x in curve["seq_len"]})
    stats = length_stats(lengths, candidates)
    seq_len = {"coverage": params.seq_len_choice.coverage,
               "inputs": {k: v for k, v in stats.items() if k != "truncated_share"}, "choice": choices}
    with atomic_output_dir(out_dir) as scratch:
        table.to_csv(scratch / "benchmark.csv", index=False, float_format="%.6g")
        judged.to_csv(scratch / "evaluation.csv", index=False, float_format="%.6g")
        compiled.to_csv(scratch / "compile.csv", index=False, float_format="%.6g")
        curve.to_csv(scratch / "latency_curve.csv", index=False, float_format="%.6g")
        bundles.to_csv(scratch / "bundles.csv", index=False, float_format="%.6g")
        choice_table.to_csv(scratch / "seq_len_choice.csv", index=False, float_format="%.6g")
        searched.to_csv(scratch / "prune_search.csv", index=False, float_format="%.6g")
        sensitivity.to_csv(scratch / SENSITIVITY_TABLE, index=False, float_format="%.6g")
        write_json_atomic(scratch / AUTO_MIXED, assignments)
        write_json_atomic(scratch / "summary.json", {**summary, "best_within_budget": best, "seq_len_choice": seq_len,
                                                     "shape_choice": shape_choice, "prune_search": prune_verdicts})
        write_json_atomic(scratch / "input_lengths.json", stats)
        write_stamp(scratch, key, {"rows": len(table), "evaluation_rows": len(judged), "compile_rows": len(compiled),
                                   "curve_rows": len(curve), "bundle_rows": len(bundles), "sensitivity_rows": len(sensitivity)})
    return {
        # Through JSON so missing values are None (the Prefect result is stored as JSON).
        "rows": json.loads(table.to_json(orient="records")),
        "evaluation_rows": json.loads(judged.to_json(orient="records")),
        "compile_rows": json.loads(compiled.to_json(orient="records")),
        "curve_rows": json.loads(curve.to_json(orient="records")),
        "bundle_rows": json.loads(bundles.to_json(orient="records")),
        "shape_choice": shape_choice,
        "sensitivity_rows": len(sensitivity),
        "summary": summary,
        "best_within_budget": best,
        "seq_len_choice": seq_len,
    }
