"""Automatic input-size choice: which static sequence length to deploy on each device.

NPUs need static shapes, so every artifact is built for one length L, and an input longer than L is
truncated. Given the user's text (by default the calibration pool, `artifacts/calibration_data/
text_pool.csv`: every unique sentence of `calibration_data.sources`) and the latency measured per
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

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.calibration_data import CalibrationSource, read_source
from tasks.errors import InputError

GRID_POINTS = 64  # points on the report's truncation curve
CHOICE_COLUMNS = ["device", "target", "seq_len", "truncated_share", "covered_share", "model", "variant",
                  "latency_p50_ms", "measured_by", "simulated", "chosen"]


class LatencyCurveParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_lens: list[int] = Field(
        [], description="extra lengths timed for the seq-len choice (e.g. [64, 256, 384]); [] = off"
    )
    calibration_samples: int = Field(32, ge=1, description="calibration rows per extra length (latency only)")

    @field_validator("seq_lens")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if s <= 2 or s > 8192]
        if bad:
            raise ValueError(f"latency curve lengths must be between 3 and 8192, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate lengths in {v}")
        return v


class SeqLenChoiceParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    coverage: float = Field(0.99, gt=0, le=1, description="share of inputs the chosen length must keep whole")
    text: CalibrationSource = Field(
        CalibrationSource(path=Path("artifacts/calibration_data/text_pool.csv"), format="csv", column="sentence"),
        description="the inputs the deployed model will see (default: the calibration pool)",
    )


def input_lengths(tokenizer, source: CalibrationSource) -> np.ndarray:
    """Tokens per unique non-blank input of `source`, special tokens included (what L must hold)."""
    path = Path(source.path)
    if not path.is_file():
        raise InputError(f"{path}: text for the seq-len choice not found; fix report.seq_len_choice.text.path")
    texts = list(dict.fromkeys(t.strip() for t in read_source(source, path) if t.strip()))
    if not texts:
        raise InputError(f"{path}: no text for the seq-len choice; fix report.seq_len_choice.text")
    specials = int(tokenizer.num_special_tokens_to_add(pair=False))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([len(i) for i in ids], dtype=np.int64) + specials


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


def choose(lengths: np.ndarray, latency: pd.DataFrame, coverage: float) -> tuple[pd.DataFrame, dict]:
    """The candidate table (CHOICE_COLUMNS) and, per "device/target", the recommended length and why."""
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
        kept = f"{int(pick['seq_len'])} tokens keep {pick['covered_share']:.1%} of {len(lengths)} inputs whole"
        fit = (f"{kept} (target {coverage:.1%})" if len(fits) else
               f"{kept}, short of the {coverage:.1%} target: the longest length measured; measure longer lengths")
        which = f"{pick['model']}/{pick['variant']}"
        if pick["measured_by"] == "benchmark":
            which += " is the fastest within the accuracy budget there"
        else:
            nearest = _nearest(sorted(int(x) for x in group.loc[group["measured_by"] == "benchmark", "seq_len"]),
                               int(pick["seq_len"]))
            which += (f" is the fastest within the accuracy budget at {nearest} tokens (accuracy is measured at "
                      f"deployed lengths), timed at {int(pick['seq_len'])} by the latency curve")
        speedup = float(longest["latency_p50_ms"]) / float(pick["latency_p50_ms"])
        cost = "" if longest["seq_len"] == pick["seq_len"] else (
            f", {speedup:.1f}x faster than at {int(longest['seq_len'])} tokens ({float(longest['latency_p50_ms']):.2f} ms)")
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
