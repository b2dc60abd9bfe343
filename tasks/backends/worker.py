"""Benchmark worker: measures one artifact on one backend in a process of its own.

Engines sharing a process skew each other (ORT ran 2x slower beside loaded OpenVINO models), so the
benchmark, reference and latency-curve stages start `python -m tasks.backends.worker REQUEST.json` once
per artifact and timing repeat. Request: backend, artifact, threads, warmup_runs, timed_runs (0 for
outputs only), feeds (npz), result (json), outputs (npy path, or null for timing only), and optionally
cache_dir (an engine cache folder, passed to backends whose `load` takes one: OpenVINO's CACHE_DIR) and
label (for the progress bar). The first row of the feeds is the timing input; all rows are run for outputs.

Result: latencies_ms, start_ms (load + compile + first run, with whatever the engine cache holds),
peak_rss_mb, precision, engine_version.
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from pydantic import Field

from tasks.backends import get_backend
from tasks.core.errors import BenchmarkError
from tasks.core.params import StrictParams


class MixTiming(StrictParams):
    """The benchmark's settings a timing of the user's inputs uses (one timed run per input and arm)."""

    threads: int = Field(ge=1)
    warmup_runs: int = Field(ge=1)
    worker_timeout_s: float = Field(gt=0)


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space exec created; ru_maxrss
    would also count the parent's pages this process held between fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_options(backend, **options) -> dict:
    """The optional `load` arguments this backend takes, of those given (not None): `cache_dir` for an engine
    cache (OpenVINO's CACHE_DIR), `shared_threads` for engines whose sessions can share one thread pool."""
    accepted = inspect.signature(backend.load).parameters
    return {k: v for k, v in options.items() if v is not None and k in accepted}


def measure(request: dict) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    backend = get_backend(request["backend"])
    with np.load(request["feeds"]) as npz:
        feeds = {name: npz[name] for name in npz.files}
    rows = next(iter(feeds.values())).shape[0]
    first = {name: arr[:1] for name, arr in feeds.items()}
    extra = load_options(backend, cache_dir=Path(request["cache_dir"]) if request.get("cache_dir") else None)

    start = time.perf_counter()
    model = backend.load(Path(request["artifact"]), int(request["threads"]), **extra)
    model.run(first)
    start_ms = (time.perf_counter() - start) * 1e3

    warmup, timed = int(request["warmup_runs"]), int(request["timed_runs"])
    label = request.get("label") or Path(request["artifact"]).name
    latencies: list[float] = []
    outputs = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        if timed:
            timing = progress.add_task(f"{label}: {warmup} warm-up + {timed} timed runs", total=warmup + timed)
            for _ in range(warmup):
                model.run(first)
                progress.advance(timing)
            for _ in range(timed):
                t0 = time.perf_counter()
                model.run(first)
                latencies.append((time.perf_counter() - t0) * 1e3)
                progress.advance(timing)
        if request.get("outputs"):
            running = progress.add_task(f"{label}: running {rows} samples", total=rows)
            for i in range(rows):
                outputs.append(model.run({name: arr[i : i + 1] for name, arr in feeds.items()})[0])
                progress.advance(running)
    if request.get("outputs"):
        np.save(request["outputs"], np.stack(outputs).astype(np.float32))
    return {
        "latencies_ms": latencies,
        "start_ms": start_ms,
        "peak_rss_mb": peak_rss_mb(),
        "precision": model.precision,
        "engine_version": metadata.version(backend.engine_package),
    }


def launch_worker(request: dict, timeout_s: float, module: str = "tasks.backends.worker") -> dict:
    """Run `module`'s main on `request` in a fresh interpreter (default: `measure`); raise BenchmarkError with
    its last line on failure."""

    what = request.get("artifact") or request.get("bundle") or request.get("label") or module
    request_path = Path(request["result"]).with_name(Path(request["result"]).stem + "-request.json")
    request_path.write_text(json.dumps(request), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(request["threads"])}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, str(request_path)],
            stdout=subprocess.PIPE,
            stderr=None if sys.stderr.isatty() else subprocess.PIPE,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(
            f"benchmark worker for {what} exceeded benchmark.worker_timeout_s={timeout_s}"
        ) from exc
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["see the output above"]
        raise BenchmarkError(f"benchmark worker failed on {what} (exit {proc.returncode}): {tail[0]}")
    return json.loads(Path(request["result"]).read_text(encoding="utf-8"))


def serve(measure_request, argv: list[str]) -> int:
    """A worker process's main: `measure_request` on the request file named in `argv`; its result to `result`."""
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = measure_request(request)
    Path(request["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(serve(measure, sys.argv[1:]))
