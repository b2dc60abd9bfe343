"""Speed ratios measured interleaved: two or more artifacts timed in alternating worker processes of one run.

A ratio of two benchmark rows can compare measurements made hours apart (a cached row from an earlier run)
on a machine whose load changed in between. Here every round times each artifact once, in its own fresh
worker process (engines sharing a process skew each other), in an order that reverses every round so that
a drift in machine load hits both sides alike; the ratio is taken per round and summarised over rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.backends.measure import WorkerPool
from tasks.core.machine import host_cpu


@dataclass(frozen=True)
class Arm:
    """One artifact to time: `label` names it in tables (e.g. `pruned/fp32 ort_cpu host`)."""

    label: str
    device: str
    artifact: Path


def time_interleaved(pool: WorkerPool, arms: list[Arm], *, rounds: int, warmup: int, timed: int,
                     on_measured: Callable[[int, Arm], None] | None = None) -> list[dict]:
    """One row per (round, arm): its p50/p90/mean over `timed` runs after `warmup`, and the order it ran in."""
    if len(arms) < 2 or rounds < 1:
        raise ValueError("time_interleaved needs at least two arms and one round")
    cpu_model, cpu_flags = host_cpu()
    rows = []
    for round_no in range(1, rounds + 1):
        order = arms if round_no % 2 else arms[::-1]
        for position, arm in enumerate(order, start=1):
            measured = pool.run(arm.device, arm.artifact, warmup=warmup, timed=timed,
                                label=f"round {round_no}/{rounds}: {arm.label}")
            lat = np.asarray(measured["latencies_ms"])
            rows.append({
                "round": round_no, "position": position, "arm": arm.label, "device": arm.device,
                "artifact": Path(arm.artifact).as_posix(), "timed_runs": len(lat),
                "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p90_ms": float(np.percentile(lat, 90)),
                "latency_mean_ms": float(lat.mean()), "threads": pool.threads, "precision": measured["precision"],
                "engine_version": measured["engine_version"], "cpu_model": cpu_model, "cpu_flags": cpu_flags,
            })
            if on_measured:
                on_measured(round_no, arm)
    return rows


def speedups(rows: list[dict], baseline: str) -> list[dict]:
    """Per arm: median p50 over rounds and its speed-up over `baseline` (baseline p50 / arm p50 within each
    round), as the median and the range over rounds."""
    by_round: dict[int, dict[str, float]] = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["arm"]] = row["latency_p50_ms"]
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not one of the timed arms {arms}")
    summary = []
    for arm in arms:
        p50s = np.array([r[arm] for r in by_round.values()])
        ratios = np.array([r[baseline] / r[arm] for r in by_round.values()])
        summary.append({
            "arm": arm, "rounds": len(p50s), "latency_p50_ms_median": float(np.median(p50s)),
            "latency_p50_ms_min": float(p50s.min()), "latency_p50_ms_max": float(p50s.max()),
            "speedup_median": float(np.median(ratios)), "speedup_min": float(ratios.min()),
            "speedup_max": float(ratios.max()),
        })
    return summary
