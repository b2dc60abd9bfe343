"""Stage benchmark: latency, cold start, size and STS-B accuracy of one artifact on one device.

Reads: the artifact, the tokenizer from the fetched model folder, the STS-B test split and (for
non-reference variants) the reference variant's embeddings. Writes: `<out>/embeddings.npy`
(one row per unique test sentence) and `<out>/stage.json` whose `row` is one row of
`metrics/benchmark.csv`. Timing runs in a separate process (`tasks.bench_worker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from tasks.backends import get_backend
from tasks.config import BenchmarkParams
from tasks.errors import BackendUnavailableError, BenchmarkError
from tasks.export_onnx import tokenize
from tasks.fingerprint import atomic_output_dir, file_sha256, write_stamp
from tasks.stsb import read_pairs

TOOLS = ("onnxruntime", "transformers", "scipy", "numpy")
EMBEDDINGS = "embeddings.npy"


def _unique_sentences(pairs) -> tuple[list[str], np.ndarray, np.ndarray]:
    sentences = list(dict.fromkeys([*pairs["sentence1"], *pairs["sentence2"]]))
    index = {s: i for i, s in enumerate(sentences)}
    return sentences, pairs["sentence1"].map(index).to_numpy(), pairs["sentence2"].map(index).to_numpy()


def _run_worker(request: dict, timeout_s: float) -> dict:
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


def run(
    *,
    artifact: Path,
    model_dir: Path,
    stsb_test: Path,
    reference_embeddings: Path | None,
    model_name: str,
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
    sentences, left, right = _unique_sentences(pairs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    feeds = tokenize(tokenizer, sentences, seq_len)

    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp:
        np.savez(Path(tmp) / "feeds.npz", **feeds)
        measured = _run_worker(
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
        if reference_embeddings is None:
            cos_ref = np.ones(len(emb))
        else:
            ref = np.load(reference_embeddings)
            if ref.shape != emb.shape:
                raise BenchmarkError(
                    f"{reference_embeddings}: reference has shape {ref.shape}, this run {emb.shape}; "
                    "rerun the reference benchmark with the same benchmark.stsb_pairs"
                )
            cos_ref = np.sum(emb * ref, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))

        lat = np.asarray(measured["latencies_ms"])
        row = {
            "model": model_name,
            "variant": variant,
            "device": device,
            "seq_len": seq_len,
            "artifact": Path(artifact).as_posix(),
            "artifact_sha256": file_sha256(Path(artifact)),
            "size_mb": Path(artifact).stat().st_size / 1e6,
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
