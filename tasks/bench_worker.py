"""Benchmark worker: measures one artifact on one backend in a process of its own.

Engines sharing a process skew each other (ORT ran 2x slower beside loaded OpenVINO models), so
`tasks.benchmark` starts `python -m tasks.bench_worker REQUEST.json` once per artifact.
Request: backend, artifact, threads, warmup_runs, timed_runs (0 for embeddings only), feeds (npz),
result (json), embeddings (npy). The first row of the feeds is the timing input; all rows are embedded.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np


def measure(request: dict) -> dict:
    from rich.console import Console
    from rich.progress import track

    from tasks.backends import get_backend

    backend = get_backend(request["backend"])
    with np.load(request["feeds"]) as npz:
        feeds = {name: npz[name] for name in npz.files}
    rows = next(iter(feeds.values())).shape[0]
    first = {name: arr[:1] for name, arr in feeds.items()}

    start = time.perf_counter()
    model = backend.load(Path(request["artifact"]), int(request["threads"]))
    model.run(first)
    cold_start_ms = (time.perf_counter() - start) * 1e3

    for _ in range(int(request["warmup_runs"])):
        model.run(first)
    latencies = []
    for _ in range(int(request["timed_runs"])):
        t0 = time.perf_counter()
        model.run(first)
        latencies.append((time.perf_counter() - t0) * 1e3)

    console = Console(stderr=True)
    embeddings = [
        model.run({name: arr[i : i + 1] for name, arr in feeds.items()})[0]
        for i in track(range(rows), description=f"embedding {rows} sentences", console=console, transient=True)
    ]
    np.save(request["embeddings"], np.stack(embeddings).astype(np.float32))
    return {
        "latencies_ms": latencies,
        "cold_start_ms": cold_start_ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": model.precision,
        "engine_version": metadata.version(backend.engine_package),
    }


def launch_worker(request: dict, timeout_s: float) -> dict:
    """Run `measure(request)` in a fresh interpreter; raise BenchmarkError with its last line on failure."""
    from tasks.errors import BenchmarkError

    request_path = Path(request["result"]).with_name("request.json")
    request_path.write_text(json.dumps(request), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(request["threads"])}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tasks.bench_worker", str(request_path)],
            stdout=subprocess.PIPE,
            stderr=None if sys.stderr.isatty() else subprocess.PIPE,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(
            f"benchmark worker for {request['artifact']} exceeded benchmark.worker_timeout_s={timeout_s}"
        ) from exc
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["see the output above"]
        raise BenchmarkError(f"benchmark worker failed on {request['artifact']} (exit {proc.returncode}): {tail[0]}")
    return json.loads(Path(request["result"]).read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = measure(request)
    Path(request["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
