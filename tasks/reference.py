"""Stage reference: fp32 embeddings of held-out sentences, what every variant is compared against.

Reads: the fp32 export for one sequence length, the tokenizer, the STS-B test split. Writes:
`<out>/embeddings.npy` for the first `reference.sentences` unique test sentences (pair order, see
`tasks.stsb.unique_sentences`), computed by ONNX Runtime on the CPU in a worker process, and
`<out>/stage.json`. A separate stage, so that every benchmark target (fp32 on ORT CPU included)
depends on it and none depends on another target.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from tasks.bench_worker import launch_worker
from tasks.config import ReferenceParams
from tasks.export_onnx import tokenize
from tasks.fingerprint import atomic_output_dir, file_sha256, write_stamp
from tasks.stsb import read_pairs, unique_sentences

TOOLS = ("onnxruntime", "transformers", "numpy")
EMBEDDINGS = "embeddings.npy"
REFERENCE_DEVICE = "ort_cpu"


def run(*, model: Path, model_dir: Path, stsb_test: Path, seq_len: int, params: ReferenceParams, out_dir: Path, key: str) -> dict:
    from transformers import AutoTokenizer

    sentences, _, _ = unique_sentences(read_pairs(stsb_test))
    sentences = sentences[: params.sentences]
    feeds = tokenize(AutoTokenizer.from_pretrained(model_dir), sentences, seq_len)
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-ref-") as tmp:
        np.savez(Path(tmp) / "feeds.npz", **feeds)
        launch_worker(
            {
                "backend": REFERENCE_DEVICE,
                "artifact": str(Path(model).resolve()),
                "threads": 1,
                "warmup_runs": 0,
                "timed_runs": 0,
                "feeds": str(Path(tmp) / "feeds.npz"),
                "result": str(Path(tmp) / "result.json"),
                "embeddings": str(scratch / EMBEDDINGS),
            },
            timeout_s=3600,
        )
        payload = {"sentences": len(sentences), "seq_len": seq_len, "model_sha256": file_sha256(Path(model))}
        write_stamp(scratch, key, payload)
    return payload
