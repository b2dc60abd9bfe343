"""A deployable bundle: one static-shape artifact per bucket (or one dynamic-shape artifact), the preprocessor,
and a manifest that routes.

Static shapes are an NPU constraint: an artifact built for 128 tokens makes a 12-token sentence pay for 128.
A bundle holds the same variant built at several lengths (buckets); each input goes to the smallest bucket
that holds it whole, and an input longer than the largest bucket is truncated to it (counted, and warned
about once per call). The benchmark's input-mix latency runs through this class, so what it measures is
what a deployment embedding it gets. A dynamic bundle (`Manifest.dynamic`) holds one artifact with a free shape
axis: each input runs at its own length, up to the bucket's (longer ones truncated the same way). A dynamic bundle
may also pin that one artifact at a few static lengths (`Manifest.pinned`): the engine compiles it once per length
when the bundle loads and each input goes to the smallest that holds it, as with buckets (OpenVINO runs a static
graph faster than a free-axis one whose length changes from input to input):

    bundle = Bundle.load("artifacts/bundle/dense/ort_qdq_a8w8-ort_cpu/host", threads=2)
    embeddings = bundle.run(["a sentence", "another one"])   # [2, dim], each at its own bucket

On ONNX Runtime the buckets' sessions share one process-wide thread pool (separate pools spin after each run
and starve each other: 4-5x slower on 2 cores); ORT then requires every other session of the process to set
`use_per_session_threads = False`.

Folder layout: `manifest.json` (`Manifest`), `preprocessor/` (e.g. the tokenizer) and one folder per bucket
(`seq<L>/`, the artifact's files as the pipeline made them).
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from tasks.backends import get_backend
from tasks.backends.worker import load_options
from tasks.core.errors import InputError
from tasks.core.params import StrictParams
from tasks.families import FAMILIES

MANIFEST = "manifest.json"
PREPROCESSOR = "preprocessor"
log = logging.getLogger(__name__)


class Bucket(StrictParams):
    shape: int = Field(ge=1, description="the static length (tokens for text) the artifact takes; dynamic: its maximum")
    artifact: str = Field(description="the artifact's file, relative to the bundle folder")


class Manifest(StrictParams):
    """What a bundle holds and how inputs are routed; written as `manifest.json`."""

    family: str = Field(description="the model family (tasks.families) that prepares raw samples")
    device: str = Field(description="the backend (tasks.backends) that runs the artifacts")
    target: str = Field(description="the compile target (e.g. a Snapdragon SoC), or host")
    buckets: list[Bucket] = Field(min_length=1, description="ascending by shape")
    dynamic: bool = Field(False, description="one artifact with a free shape axis: every input at its own length")
    pinned: list[int] = Field([], description="dynamic only: the static lengths its artifact is compiled at when "
                              "loaded, each input routed to the smallest that holds it; empty: each at its own length")
    routing: str = "smallest bucket that holds the input whole; longer inputs truncated to the largest"
    engine_options: dict[str, str] = Field(
        {}, description="options of the device backend's `load` the artifacts run with (e.g. inference_precision: bf16 "
        "on OpenVINO CPU: an engine precision is a deployment of its own, measured and judged as one)")

    @model_validator(mode="after")
    def _one_dynamic_artifact(self) -> Manifest:
        if self.dynamic and len(self.buckets) != 1:
            raise ValueError("a dynamic bundle holds one artifact (one bucket: its maximum length)")
        if self.pinned and not self.dynamic:
            raise ValueError("pinned lengths are for a dynamic bundle's one artifact; a static bundle has buckets")
        if self.pinned and (self.pinned != sorted(set(self.pinned)) or self.pinned[0] < 1
                            or self.pinned[-1] != self.buckets[0].shape):
            raise ValueError(f"pinned lengths must be distinct, ascending and end at the artifact's maximum "
                             f"{self.buckets[0].shape}, got {self.pinned}")
        return self

    @field_validator("buckets")
    @classmethod
    def _ascending(cls, v: list[Bucket]) -> list[Bucket]:
        shapes = [b.shape for b in v]
        if shapes != sorted(set(shapes)):
            raise ValueError(f"bucket shapes must be distinct and ascending, got {shapes}")
        return v

    @property
    def shapes(self) -> list[int]:
        return [b.shape for b in self.buckets]


@dataclass(frozen=True)
class Routes:
    """Where each input goes: its size along the shape axis, the shape it runs at (its bucket, or in a dynamic
    bundle its own size), and whether it is cut."""

    lengths: np.ndarray
    shapes: np.ndarray
    truncated: np.ndarray

    def counts(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in sorted(Counter(self.shapes.tolist()).items())}


def route(lengths: np.ndarray, shapes: list[int], dynamic: bool = False) -> Routes:
    """Each input's bucket: the smallest shape >= its length, else the largest (the input is truncated).
    `dynamic`: each input at its own length, capped at the one shape."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ordered = np.asarray(sorted(shapes), dtype=np.int64)
    if dynamic:
        return Routes(lengths, np.minimum(lengths, ordered[-1]), lengths > ordered[-1])
    at = np.searchsorted(ordered, lengths, side="left")
    truncated = at >= len(ordered)
    return Routes(lengths, ordered[np.minimum(at, len(ordered) - 1)], truncated)


def prepare(family, preprocessor, samples: list, shapes) -> list[dict[str, np.ndarray]]:
    """One batch-of-one feed per sample, each at its own shape (padded, or truncated when longer): the samples of
    each shape are prepared together, once, and only those (a dynamic bundle has a shape per input length)."""
    shapes = np.asarray(shapes, dtype=np.int64)
    feeds: list[dict[str, np.ndarray] | None] = [None] * len(samples)
    for shape in np.unique(shapes):
        rows = np.flatnonzero(shapes == shape)
        at_shape = family.samples(preprocessor, [samples[i] for i in rows], int(shape))
        for j, i in enumerate(rows):
            feeds[i] = {k: v[j : j + 1] for k, v in at_shape.items()}
    return feeds


class Bundle:
    """A loaded bundle: the preprocessor and one ready session per bucket."""

    def __init__(self, folder: Path, manifest: Manifest, preprocessor, models: dict[int, object], free: bool = False):
        self.folder, self.manifest, self.preprocessor, self.models = folder, manifest, preprocessor, models
        self.family = FAMILIES.get(manifest.family)
        self.free = free
        """The one artifact runs each input at its own length (a dynamic bundle not pinned, or loaded unpinned)."""

    @classmethod
    def load(cls, folder: Path | str, threads: int, cache_dir: Path | None = None, pinned: bool = True) -> Bundle:
        """The bundle at `folder` ready to run. `pinned=False` runs a pinned dynamic bundle's artifact at each
        input's own length instead (what its `pinned` lengths are measured against)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        backend = get_backend(manifest.device)
        # Several sessions in one process: engines with per-session thread pools share one (ONNX Runtime's per-session
        # pools spin after each run and starve the next bucket's: 4-5x slower on 2 cores). ORT then refuses sessions of
        # this process made elsewhere with a pool of their own (use_per_session_threads must be False for them).
        options = {**load_options(backend, cache_dir=cache_dir, shared_threads=True), **engine_options(folder, manifest)}
        if options.get("cache_dir") is not None:
            options["cache_dir"] = Path(options["cache_dir"]) / engine_cache_folder(manifest.engine_options)
        if manifest.pinned and pinned:
            if not getattr(backend, "pins_shapes", False):
                raise InputError(f"{folder / MANIFEST}: {manifest.device} cannot pin a dynamic artifact's shapes; "
                                 "remove `pinned` from the manifest")
            artifact = folder / manifest.buckets[0].artifact
            models = {shape: backend.load(artifact, threads, pin_shape=shape, **options) for shape in manifest.pinned}
        else:
            models = {b.shape: backend.load(folder / b.artifact, threads, **options) for b in manifest.buckets}
        preprocessor = FAMILIES.get(manifest.family).load_preprocessor(folder / PREPROCESSOR)
        return cls(folder, manifest, preprocessor, models, free=manifest.dynamic and not (manifest.pinned and pinned))

    @property
    def precision(self) -> str:
        """The numeric precision the engine runs the artifacts at (as it reports it: a bf16 hint on a CPU without
        bf16 runs f32)."""
        return next(iter(self.models.values())).precision

    @property
    def shapes(self) -> list[int]:
        """The lengths inputs are routed to (a free artifact: its maximum)."""
        return sorted(self.models)

    def routes(self, samples: list) -> Routes:
        return route(self.family.input_lengths(self.preprocessor, samples), self.shapes, self.free)

    def model(self, shape: int):
        """The session that runs inputs prepared at `shape` (a free artifact takes any up to its maximum)."""
        if self.free:
            if shape > self.shapes[0]:
                raise InputError(f"{self.folder}: shape {shape} above the dynamic artifact's {self.shapes[0]}")
            return self.models[self.shapes[0]]
        if shape not in self.models:
            raise InputError(f"{self.folder}: no bucket of shape {shape}; it has {self.shapes}")
        return self.models[shape]

    def feeds(self, samples: list, shape: int) -> dict[str, np.ndarray]:
        """Every sample prepared at `shape` (padded, or truncated when longer)."""
        return self.family.samples(self.preprocessor, samples, shape)

    def feeds_at(self, samples: list, shapes) -> list[dict[str, np.ndarray]]:
        """One batch-of-one feed per sample at its shape in `shapes` (`prepare`)."""
        return prepare(self.family, self.preprocessor, samples, shapes)

    def run(self, samples: list) -> np.ndarray:
        """One output row per sample, each run at its bucket; warns once when inputs were truncated."""
        routes = self.routes(samples)
        if routes.truncated.any():
            log.warning("%d of %d inputs are longer than the largest bucket (%d) and were truncated",
                        int(routes.truncated.sum()), len(samples), self.shapes[-1])
        feeds = self.feeds_at(samples, routes.shapes)
        outputs = [self.model(int(shape)).run(feed)[0] for shape, feed in zip(routes.shapes, feeds, strict=True)]
        return np.stack(outputs)


def engine_cache_folder(options: dict[str, str]) -> str:
    """The engine-cache subfolder of bundles loaded with these engine options.

    OpenVINO 2026.4's cache key leaves INFERENCE_PRECISION_HINT out: an f32 and a bf16 compile of one model in one
    CACHE_DIR share a blob, so the second silently runs the first's graph (and on a free axis crashes the process).
    """
    return "_".join(f"{key}-{value}" for key, value in sorted(options.items())) or "default"


def engine_options(folder: Path, manifest: Manifest) -> dict[str, str]:
    """The manifest's `engine_options`, refused in one line when the device's backend does not take them."""
    accepted = inspect.signature(get_backend(manifest.device).load).parameters
    unknown = sorted(set(manifest.engine_options) - set(accepted))
    if unknown:
        raise InputError(f"{Path(folder) / MANIFEST}: engine_options {unknown} are not options {manifest.device} loads "
                         "with; remove them")
    return dict(manifest.engine_options)


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: not found; a bundle folder is what the bundle stage writes (artifacts/bundle/...)")
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"])) or "manifest"
        raise InputError(f"{path}: not a bundle manifest ({where}: {error['msg']})") from None

