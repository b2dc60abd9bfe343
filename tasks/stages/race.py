"""Stage race: every timed bundle of a device run again side by side on the user's inputs.

Each bundle stage times its own (model, target) in a process of its own, at a moment of its own; on a shared
or busy machine two variants' mix latencies then differ by more than the variants do, and which one the report
recommends flipped between runs (docs/bundles.md). The recommendation compares rows, so it ranks them on this
stage's timings: per device, one worker process (`tasks.runtime.peer_worker`, as `edgeopt peers` uses) runs
every timed bundle row of that device (each model, variant, compile target and shape policy, deployed as its
bundle deploys it) input by input in rotating order, on the same seeded sample of the user's inputs as the
bundle stage; `race.rounds` times, the devices' processes alternating (engines in one process skew each
other). Simulated rows are not timed (simulator time is not device latency).

Reads: the bundle stage outputs (their `stage.json` rows and bundle folders) and the mix text.
Writes: `<out>/stage.json` (`rows`: the bundle row's key, `race_mean_ms` / `race_p50_ms` / `race_p99_ms`
(per round, then the median over rounds), `race_arms` (rows timed together on the device), `race_rounds`,
`cpu_model`, `cpu_flags`, `threads`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.backends.worker import MixTiming, launch_worker
from tasks.core.errors import StageError
from tasks.core.fingerprint import atomic_output_dir, read_stamp, write_stamp
from tasks.core.machine import host_cpu
from tasks.core.params import StrictParams
from tasks.core.schemas import BUNDLE_KEY, DYNAMIC, STATIC
from tasks.data.text import MixSample, TextSource, mix_sample
from tasks.families.base import FamilySettings
from tasks.runtime import peer_worker

TOOLS = ("onnxruntime", "openvino", "transformers", "numpy")


class RaceParams(StrictParams):
    rounds: int = Field(1, ge=1, description="times every device's bundle rows are timed side by side; more rounds "
                        "alternate the devices' processes (the median of the rounds' means is kept)")


def arms(bundle_dirs: list[Path]) -> dict[str, list[dict]]:
    """Device -> one worker arm per timed bundle row (its bundle folder, routed as the row's policy says)."""
    by_device: dict[str, list[dict]] = {}
    for folder in bundle_dirs:
        stamp = read_stamp(folder)
        if stamp is None or "rows" not in stamp:
            raise StageError(f"{folder}: no finished bundle stage output; run the bundle stages first")
        for row in stamp["rows"]:
            if row["simulated"] or row.get("latency_mix_mean_ms") is None:
                continue
            by_device.setdefault(row["device"], []).append({
                "label": json.dumps({k: row[k] for k in BUNDLE_KEY}),
                "bundle": str((Path(folder) / row["target"]).resolve()),
                "policy": int(row["shapes"]) if row["policy"] == STATIC else "buckets",
                # A pinned bundle's dynamic row is its artifact at each input's own length: the bundle loaded unpinned.
                "pinned": row["policy"] != DYNAMIC,
            })
    return by_device


def run(
    *,
    bundle_dirs: list[Path],
    text: Path,
    text_source: TextSource,
    sample: MixSample,
    params: RaceParams,
    timing: MixTiming,
    family: FamilySettings,
    out_dir: Path,
    key: str,
) -> dict:
    """Time every device's bundle rows interleaved in one process per device, `params.rounds` times."""
    rounds = params.rounds
    by_device = arms(bundle_dirs)
    samples = mix_sample(text_source, Path(text), sample.mix_samples, sample.seed)
    cpu_model, cpu_flags = host_cpu()
    devices = sorted(by_device)
    per_round: dict[str, list[np.ndarray]] = {}
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-race-") as tmp_name:
        tmp = Path(tmp_name)
        samples_path = tmp / "samples.json"
        samples_path.write_text(json.dumps(samples), encoding="utf-8")
        for round_no in range(1, rounds + 1):
            for device in devices if round_no % 2 else devices[::-1]:
                outputs = tmp / f"out-{round_no}-{device}"
                outputs.mkdir()
                result = launch_worker(
                    {"arms": by_device[device], "preprocessor": by_device[device][0]["bundle"], "family": family.name,
                     "samples": str(samples_path), "threads": timing.threads, "warmup_runs": timing.warmup_runs,
                     "outputs": str(outputs), "cache_dir": str(tmp / f"cache-{device}"),
                     "label": f"race round {round_no}/{rounds} {device}",
                     "result": str(tmp / f"result-{round_no}-{device}.json")},
                    timing.worker_timeout_s * len(by_device[device]), module=peer_worker.__name__)
                for arm, latencies in zip(by_device[device], result["latencies_ms"], strict=True):
                    per_round.setdefault(arm["label"], []).append(np.asarray(latencies))
        rows = []
        for device in devices:
            for arm in by_device[device]:
                rounds_ms = per_round[arm["label"]]
                rows.append({
                    **json.loads(arm["label"]),
                    "race_mean_ms": float(np.median([r.mean() for r in rounds_ms])),
                    "race_p50_ms": float(np.median([np.percentile(r, 50) for r in rounds_ms])),
                    "race_p99_ms": float(np.median([np.percentile(r, 99) for r in rounds_ms])),
                    "race_arms": len(by_device[device]), "race_rounds": rounds, "race_inputs": len(samples),
                    "threads": timing.threads, "cpu_model": cpu_model, "cpu_flags": cpu_flags,
                })
        payload = {"rows": rows}
        write_stamp(scratch, key, payload)
    return payload
