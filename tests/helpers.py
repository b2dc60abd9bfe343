"""What many tests share: sentences from the tiny vocabulary, running an ONNX model, quantizing a variant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_models import WORDS


def sentences(n: int, seed: int, end: str = "") -> list[str]:
    """`n` seeded random sentences of 3-11 words of the tiny models' vocabulary (each ending with `end`)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + end for _ in range(n)]


def ort_embed(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's `embedding` output for each row of `feeds`, on the ONNX Runtime CPU EP."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = range(len(feeds["input_ids"]))
    return np.concatenate([session.run(["embedding"], {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in rows])


def quantize_variant(tmp_path: Path, model: Path, calib: Path | None, name: str, settings, **extra):
    """The quantize stage on `model` with one variant `name`; (its output folder, its payload)."""
    from conftest import SENTENCE_ENCODER

    from tasks.stages.quantize import QuantizeParams, run

    out = tmp_path / name
    payload = run(model=model, calibration=calib, variant=name, params=QuantizeParams(variants={name: settings}, **extra),
                  family=SENTENCE_ENCODER, out_dir=out, key="k-" + name)
    return out, payload


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between the same rows of two [N, D] arrays."""
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def run_outputs(model: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output for each row of `arrays`, fed as the model declares (build_feeds)."""
    import onnxruntime as ort

    from tasks.core.feeds import build_feeds

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rows = range(len(arrays["input_ids"]))
    return np.concatenate([sess.run(None, build_feeds(sess, {k: v[i : i + 1] for k, v in arrays.items()}))[0]
                           for i in rows])
