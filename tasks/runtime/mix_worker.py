"""Input-mix worker: runs a bundle on the user's own inputs in a process of its own (`Bundle`, as deployed).

Request (JSON): bundle (folder), threads, samples (JSON file: a list of raw samples), shapes (what to time:
`"buckets"` routes each input as the bundle does, to its bucket or, in a dynamic bundle, at its own length (or its
pinned length); `"free"` runs a pinned dynamic bundle's artifact at each input's own length instead; an int forces
every input to that one bucket, i.e. a static-shape deployment of the same artifacts), warmup_runs, timed (false: outputs only), outputs
(policy -> npy path, optional), cache_dir, label, result (JSON path).

Timing is interleaved: input by input, every policy runs the same input in rotating order, so a slow
moment of a shared CPU hits all of them alike and their ratio holds. Preparing the inputs (tokenizing)
is done once before timing and not counted: every policy would pay the same for it.

Result: per policy `latencies_ms` (one per input, in order); the routes (`lengths`, `bucket_shapes`,
`truncated` per input) and `peak_rss_mb`, `precision` (as the engine reports it), `engine_version`.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from tasks.backends import get_backend
from tasks.backends.worker import peak_rss_mb, serve
from tasks.runtime.bundle import Bundle

BUCKETS = "buckets"
FREE = "free"


def measure(request: dict) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cache_dir = Path(request["cache_dir"]) if request.get("cache_dir") else None
    threads = int(request["threads"])
    bundle = Bundle.load(request["bundle"], threads, cache_dir=cache_dir)
    samples = json.loads(Path(request["samples"]).read_text(encoding="utf-8"))
    policies = [p if p in (BUCKETS, FREE) else int(p) for p in request["shapes"]]
    routes = bundle.routes(samples)
    # Per policy: the bundle that runs it, the shape each input runs at, and its feed (prepared once per shape, for
    # the inputs at it only).
    runs_on = {p: Bundle.load(request["bundle"], threads, cache_dir=cache_dir, pinned=False) if p == FREE else bundle
               for p in policies}
    shapes = {p: routes.shapes if p == BUCKETS else runs_on[p].routes(samples).shapes if p == FREE
              else np.full(len(samples), p) for p in policies}
    feeds = {p: bundle.feeds_at(samples, shapes[p]) for p in policies}
    models = {(p, int(s)): runs_on[p].model(int(s)) for p in policies for s in np.unique(shapes[p])}
    firsts: dict[object, tuple] = {}  # model -> (policy, input) of its first feed: what warms it up
    for p in policies:
        for i, s in enumerate(shapes[p]):
            firsts.setdefault(id(models[p, int(s)]), (p, i))

    timed = bool(request.get("timed", True))
    warmup = int(request.get("warmup_runs", 0)) if timed else 0
    latencies = {str(p): [] for p in policies}
    outputs = {str(p): [] for p in policies}
    label = request.get("label") or Path(request["bundle"]).name
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        for policy, i in firsts.values():
            for _ in range(warmup):
                models[policy, int(shapes[policy][i])].run(feeds[policy][i])
        task = progress.add_task(f"{label}: {len(samples)} inputs x {len(policies)} shape policies",
                                 total=len(samples))
        for i in range(len(samples)):
            for k in range(len(policies)):
                policy = policies[(i + k) % len(policies)]  # rotate who goes first
                model, feed = models[policy, int(shapes[policy][i])], feeds[policy][i]
                t0 = time.perf_counter()
                out = model.run(feed)
                latencies[str(policy)].append((time.perf_counter() - t0) * 1e3)
                outputs[str(policy)].append(out[0])
            progress.advance(task)
    for policy, path in (request.get("outputs") or {}).items():
        np.save(path, np.stack(outputs[policy]).astype(np.float32))
    return {
        "latencies_ms": latencies if timed else {},
        "lengths": routes.lengths.tolist(),
        "bucket_shapes": routes.shapes.tolist(),
        "truncated": routes.truncated.tolist(),
        "peak_rss_mb": peak_rss_mb(),
        "precision": bundle.precision,
        "engine_version": metadata.version(get_backend(bundle.manifest.device).engine_package),
    }


if __name__ == "__main__":
    sys.exit(serve(measure, sys.argv[1:]))
