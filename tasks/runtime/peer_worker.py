"""Side-by-side timing worker: edgeopt's deployed bundles and other tools' exports of the same model, timed input by
input in one process on the same inputs and threads (`edgeopt peers`; the race stage, with bundles only).

Request (JSON): arms, preprocessor (a bundle folder: its preprocessor tokenizes for every arm), family, samples
(JSON file: a list of raw samples), threads, warmup_runs, outputs (folder: `<index>.npy` per arm), cache_dir,
label, result (JSON path). An arm is either
- `{"label", "bundle": folder, "policy": "buckets" | int, "pinned": bool}`: an edgeopt bundle run as deployed
  (`Bundle`): routed to its buckets, at each input's own length (a dynamic bundle) or its pinned lengths (unless
  `pinned` is false), or every input at one length (an int); or
- `{"label", "device", "artifact", "pooling": "mean" | null, "max_tokens"}`: another tool's export, fed each
  input unpadded at its own length (capped at `max_tokens`), as such exports are used; `pooling` mean: the export
  outputs token embeddings [1, T, D] that its user averages over the attention mask and L2-normalises (what
  sentence-transformers does after its ONNX/OpenVINO backends), counted in the arm's latency.

Timing is interleaved: input by input, every arm runs the same input in rotating order, so a slow moment of a
shared CPU hits all alike. Tokenizing is done once beforehand and not counted. Every arm of one process shares
the engine's threads (ONNX Runtime: one process-wide pool, as a bundle's sessions do).

Result: per arm `latencies_ms` (one per input, in order), `engine_version`, `peak_rss_mb`.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from tasks.backends import get_backend
from tasks.backends.worker import load_options, peak_rss_mb, serve
from tasks.families import FAMILIES
from tasks.runtime.bundle import PREPROCESSOR, Bundle, prepare, read_manifest

MASK = "attention_mask"


def mean_pool_normalise(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[1, T, D] token embeddings -> [1, D]: the mask-weighted mean over tokens, L2-normalised."""
    weights = mask[..., None].astype(np.float32)
    pooled = (tokens * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


class _Export:
    """Another tool's export: each input at its own length, its output pooled as its user would."""

    def __init__(self, arm: dict, threads: int, cache_dir: Path | None, family, preprocessor, samples: list):
        backend = get_backend(arm["device"])
        options = load_options(backend, cache_dir=cache_dir, shared_threads=True)
        self.model = backend.load(Path(arm["artifact"]), threads, **options)
        self.pooling = arm.get("pooling")
        self.feeds = prepare(family, preprocessor, samples,
                             np.minimum(family.input_lengths(preprocessor, samples), int(arm["max_tokens"])))

    def warm_inputs(self) -> list[int]:
        return [0]

    def run(self, i: int) -> np.ndarray:
        out = self.model.run(self.feeds[i])
        return mean_pool_normalise(out, self.feeds[i][MASK])[0] if self.pooling == "mean" else out[0]


class _Deployed:
    """An edgeopt bundle, routed as its policy says."""

    def __init__(self, arm: dict, threads: int, cache_dir: Path | None, samples: list, loaded: dict):
        # Arms of one bundle (its static rows beside its routed one) share its sessions: loaded once per process.
        where = (arm["bundle"], arm.get("pinned", True))
        if where not in loaded:
            loaded[where] = Bundle.load(arm["bundle"], threads, cache_dir=cache_dir, pinned=where[1])
        self.bundle = loaded[where]
        routes = self.bundle.routes(samples)
        self.shapes = routes.shapes if arm["policy"] == "buckets" else np.full(len(samples), int(arm["policy"]))
        self.feeds = self.bundle.feeds_at(samples, self.shapes)

    def warm_inputs(self) -> list[int]:
        """The first input of each session it runs (every bucket's warmed, not only the first input's; a free
        artifact is one session, warmed once, as the bundle stage's mix timing warms it)."""
        firsts: dict[int, int] = {}
        for i, shape in enumerate(self.shapes):
            firsts.setdefault(id(self.bundle.model(int(shape))), i)
        return list(firsts.values())

    def run(self, i: int) -> np.ndarray:
        return self.bundle.model(int(self.shapes[i])).run(self.feeds[i])[0]


def measure(request: dict) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    threads = int(request["threads"])
    cache_dir = Path(request["cache_dir"]) if request.get("cache_dir") else None
    samples = json.loads(Path(request["samples"]).read_text(encoding="utf-8"))
    family = FAMILIES.get(request["family"])
    preprocessor = family.load_preprocessor(Path(request["preprocessor"]) / PREPROCESSOR)
    loaded: dict[tuple[str, bool], Bundle] = {}
    arms = [_Deployed(a, threads, cache_dir, samples, loaded) if "bundle" in a
            else _Export(a, threads, cache_dir, family, preprocessor, samples) for a in request["arms"]]
    for arm in arms:
        for i in arm.warm_inputs():
            for _ in range(int(request.get("warmup_runs", 0))):
                arm.run(i)
    latencies = [[] for _ in arms]
    outputs = [[] for _ in arms]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"{request.get('label', 'peers')}: {len(samples)} inputs x {len(arms)} artifacts",
                                 total=len(samples))
        for i in range(len(samples)):
            for k in range(len(arms)):
                a = (i + k) % len(arms)  # rotate who goes first
                t0 = time.perf_counter()
                out = arms[a].run(i)
                latencies[a].append((time.perf_counter() - t0) * 1e3)
                outputs[a].append(out)
            progress.advance(task)
    folder = Path(request["outputs"])
    for a, rows in enumerate(outputs):
        np.save(folder / f"{a}.npy", np.stack(rows).astype(np.float32))
    engines = {get_backend(a.get("device") or read_manifest(Path(a["bundle"])).device).engine_package
               for a in request["arms"]}
    return {"latencies_ms": latencies, "peak_rss_mb": peak_rss_mb(),
            "engine_version": "; ".join(f"{e} {metadata.version(e)}" for e in sorted(engines))}


if __name__ == "__main__":
    sys.exit(serve(measure, sys.argv[1:]))
