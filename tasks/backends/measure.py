"""How an artifact is timed: the timing settings every timed stage shares, worker processes, the latency
columns of a row, and the files (and hash) of a deployable model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.backends.worker import launch_worker
from tasks.core.fingerprint import file_sha256
from tasks.core.params import StrictParams


class TimingParams(StrictParams):
    """Timing settings shared by the benchmark and latency-curve stages."""

    threads: int = Field(2, ge=1, le=256)
    warmup_runs: int = Field(10, ge=1)
    timed_runs: int = Field(100, ge=50, description="timed runs per repeat (at least 50 for stable percentiles)")
    repeats: int = Field(
        3, ge=2, description="timing repeats, each in a fresh process; the spread of their p50s is reported"
    )
    p50_spread_tolerance_pct: float = Field(
        5.0, gt=0, description="repeats whose p50s differ by more than this (% of their median) mark a row unstable"
    )
    worker_timeout_s: float = Field(3600, gt=0)


def model_files(artifact: Path) -> list[Path]:
    """The files a deployable model is made of: an OpenVINO IR `.xml` keeps its weights in the `.bin`
    beside it; a QNN EPContext model references its context binaries; a blob needs its plugin config."""
    artifact = Path(artifact)
    weights = artifact.with_suffix(".bin")
    if artifact.suffix == ".xml" and weights.is_file():
        return [artifact, weights]
    if artifact.suffix == ".blob":
        config = artifact.with_name("ov_config.json")
        return [artifact, config] if config.is_file() else [artifact]
    if artifact.suffix == ".onnx":
        return [artifact, *_context_binaries(artifact)]
    return [artifact]


def _context_binaries(artifact: Path) -> list[Path]:
    import onnx

    graph = onnx.load(str(artifact), load_external_data=False).graph
    found = []
    for node in graph.node:
        if node.op_type != "EPContext":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ref = attrs.get("ep_cache_context")
        embedded = int(attrs.get("embed_mode", 1)) == 1
        if ref and not embedded:
            path = artifact.with_name(ref.decode() if isinstance(ref, bytes) else str(ref))
            if path.is_file() and path not in found:
                found.append(path)
    return found


def model_sha256(files: list[Path]) -> str:
    """The file's sha256, or for a multi-file model the sha256 of its files' sha256s in order."""
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


class WorkerPool:
    """Starts bench workers (one process each) for one stage, sharing its feeds file and scratch folder."""

    def __init__(self, tmp: Path, feeds: dict[str, np.ndarray], threads: int, timeout_s: float):
        self.tmp, self.threads, self.timeout_s, self.count = tmp, threads, timeout_s, 0
        self.feeds = self.save_feeds("feeds", feeds)

    def save_feeds(self, name: str, feeds: dict[str, np.ndarray]) -> Path:
        path = self.tmp / f"{name}.npz"
        np.savez(path, **feeds)
        return path

    def run(self, device: str, artifact: Path, *, warmup: int, timed: int, outputs: Path | None = None,
            feeds: Path | None = None, cache_dir: Path | None = None, label: str = "") -> dict:
        self.count += 1
        return launch_worker(
            {
                "backend": device,
                "artifact": str(Path(artifact).resolve()),
                "threads": self.threads,
                "warmup_runs": warmup,
                "timed_runs": timed,
                "feeds": str(feeds or self.feeds),
                "result": str(self.tmp / f"result{self.count}.json"),
                "outputs": str(outputs) if outputs else None,
                "cache_dir": str(cache_dir) if cache_dir else None,
                "label": label,
            },
            self.timeout_s,
        )


def timing_columns(repeats: list[dict], tolerance_pct: float) -> dict:
    """Latency columns from the workers of one artifact: the first started with an empty engine cache."""
    blocks = [np.asarray(r["latencies_ms"]) for r in repeats]
    lat = np.concatenate(blocks)
    p50s = [float(np.percentile(b, 50)) for b in blocks]
    spread = (max(p50s) - min(p50s)) / float(np.median(p50s)) * 100 if len(p50s) > 1 else None
    return {
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p90_ms": float(np.percentile(lat, 90)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
        "latency_mean_ms": float(lat.mean()),
        "latency_std_ms": float(lat.std()),
        "timed_runs": len(lat),
        "cold_start_ms": float(repeats[0]["start_ms"]),
        "timing_repeats": len(repeats),
        "latency_p50_spread_pct": spread,
        "latency_stable": spread is not None and spread <= tolerance_pct,
        "throughput_per_s": 1e3 / float(lat.mean()),  # batch 1, one stream: inferences per second
        "warm_start_ms": float(np.median([r["start_ms"] for r in repeats[1:]])) if len(repeats) > 1 else None,
        "peak_rss_mb": max(float(r["peak_rss_mb"]) for r in repeats),
        "precision": repeats[0]["precision"],
        "engine_version": repeats[0]["engine_version"],
    }
