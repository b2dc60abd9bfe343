"""Stage benchmark: latency, cold start, size and STS-B accuracy of one artifact on one device.

Reads: the artifact, the tokenizer from the fetched model folder, the STS-B test split and the fp32
reference embeddings (stage `reference`). Writes: `<out>/embeddings.npy` (one row per unique test
sentence) and `<out>/stage.json` whose `row` is one row of `metrics/benchmark.csv`. Timing and
embedding run in a separate process (`tasks.bench_worker`).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from tasks.backends import get_backend
from tasks.config import BenchmarkParams
from tasks.bench_worker import launch_worker
from tasks.errors import BackendUnavailableError, BenchmarkError
from tasks.export_onnx import tokenize
from tasks.fingerprint import atomic_output_dir, file_sha256, write_stamp
from tasks.stsb import read_pairs, unique_sentences

TOOLS = ("onnxruntime", "transformers", "scipy", "numpy")
EMBEDDINGS = "embeddings.npy"


def run(
    *,
    artifact: Path,
    model_dir: Path,
    stsb_test: Path,
    reference_embeddings: Path,
    source_model: str,
    model: str,
    variant: str,
    device: str,
    seq_len: int,
    stage_name: str,
    params: BenchmarkParams,
    out_dir: Path,
    key: str,
) -> dict:
    from transformers import AutoTokenizer

    backend = get_backend(device)
    reason = backend.unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"device {device}: {reason}")

    pairs = read_pairs(stsb_test, limit=params.stsb_pairs)
    sentences, left, right = unique_sentences(pairs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    feeds = tokenize(tokenizer, sentences, seq_len)

    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp:
        np.savez(Path(tmp) / "feeds.npz", **feeds)
        measured = launch_worker(
            {
                "backend": device,
                "artifact": str(Path(artifact).resolve()),
                "threads": params.threads,
                "warmup_runs": params.warmup_runs,
                "timed_runs": params.timed_runs,
                "feeds": str(Path(tmp) / "feeds.npz"),
                "result": str(Path(tmp) / "result.json"),
                "embeddings": str(scratch / EMBEDDINGS),
            },
            params.worker_timeout_s,
        )
        emb = np.load(scratch / EMBEDDINGS)
        cos_pairs = np.sum(emb[left] * emb[right], axis=1) / (
            np.linalg.norm(emb[left], axis=1) * np.linalg.norm(emb[right], axis=1)
        )
        spearman = float(spearmanr(cos_pairs, pairs["score"].to_numpy()).statistic * 100)
        ref = np.load(reference_embeddings)
        n = min(len(ref), len(emb))  # both are prefixes of the same sentence order
        if ref.shape[1] != emb.shape[1]:
            raise BenchmarkError(f"{reference_embeddings}: width {ref.shape[1]} differs from this model's {emb.shape[1]}")
        cos_ref = np.sum(emb[:n] * ref[:n], axis=1) / (
            np.linalg.norm(emb[:n], axis=1) * np.linalg.norm(ref[:n], axis=1)
        )

        lat = np.asarray(measured["latencies_ms"])
        files = model_files(Path(artifact))
        row = {
            "model": model,
            "source_model": source_model,
            "variant": variant,
            "device": device,
            "seq_len": seq_len,
            "artifact": Path(artifact).as_posix(),
            "artifact_sha256": _model_sha256(files),
            "size_mb": sum(f.stat().st_size for f in files) / 1e6,
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p90_ms": float(np.percentile(lat, 90)),
            "latency_p99_ms": float(np.percentile(lat, 99)),
            "latency_mean_ms": float(lat.mean()),
            "latency_std_ms": float(lat.std()),
            "timed_runs": len(lat),
            "cold_start_ms": float(measured["cold_start_ms"]),
            "threads": params.threads,
            "precision": measured["precision"],
            "stsb_pairs": len(pairs),
            "stsb_spearman": spearman,
            "cosine_to_fp32_mean": float(cos_ref.mean()),
            "cosine_to_fp32_min": float(cos_ref.min()),
            "engine_version": measured["engine_version"],
            "dvc_stage": stage_name,
        }
        payload = {"row": row, "peak_rss_mb": measured["peak_rss_mb"]}
        write_stamp(scratch, key, payload)
    return payload


def model_files(artifact: Path) -> list[Path]:
    """The files a model is made of: an OpenVINO IR `.xml` keeps its weights in the `.bin` beside it."""
    weights = artifact.with_suffix(".bin")
    return [artifact, weights] if artifact.suffix == ".xml" and weights.is_file() else [artifact]


def _model_sha256(files: list[Path]) -> str:
    """The file's sha256, or for a multi-file model the sha256 of its files' sha256s in order."""
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
