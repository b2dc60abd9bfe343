"""Stage export_onnx: one static-shape ONNX sentence embedder per sequence length.

Reads: the fetched HF folder. Writes: `<out>/model.onnx` (inputs `input_ids`, `attention_mask`,
`token_type_ids`, int64 [1, seq_len]; output `embedding` float32 [1, hidden], mean-pooled and
L2-normalised, so the device runs the whole model) and `<out>/stage.json` with the agreement
between ONNX Runtime and torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.config import ExportOnnxParams
from tasks.errors import InputError, StageError
from tasks.fingerprint import atomic_output_dir, write_stamp

TOOLS = ("torch", "transformers", "onnx", "onnxruntime")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "embedding"

# Fixed sentences for the torch-vs-ONNX check: short, medium and one long enough to be truncated.
VERIFY_SENTENCES = (
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Edge devices run static graphs; every input is padded to the same length before inference.",
    " ".join(["Long inputs are truncated to the sequence length the model was exported with."] * 60),
)


def sentence_embedder(model):
    import torch

    class SentenceEmbedder(torch.nn.Module):
        """HF encoder + mean pooling over real tokens + L2 normalisation."""

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            # Keyword call: positional args collide with `use_cache` in transformers 5.x.
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedder(model).eval()


def tokenize(tokenizer, sentences, seq_len: int) -> dict[str, np.ndarray]:
    """Pad/truncate to the static length; int64 arrays named like the ONNX inputs."""
    enc = tokenizer(
        list(sentences), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    ids = enc["input_ids"].astype(np.int64)
    return {
        "input_ids": ids,
        "attention_mask": enc["attention_mask"].astype(np.int64),
        "token_type_ids": enc.get("token_type_ids", np.zeros_like(ids)).astype(np.int64),
    }


def load_encoder(model_dir: Path, attn_implementation: str):
    """Tokenizer and encoder of an HF folder; a folder written by the prune stage (with
    `prune.json`) has per-layer shapes HF configs cannot express, so tasks.prune rebuilds it."""
    from transformers import AutoModel, AutoTokenizer

    from tasks.prune import load_pruned, read_spec

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if read_spec(model_dir) is not None:
            model = load_pruned(model_dir, attn_implementation)
        else:
            model = AutoModel.from_pretrained(
                model_dir, attn_implementation=attn_implementation, use_safetensors=None
            ).eval()
    except (OSError, ValueError) as exc:
        raise InputError(f"{model_dir}: cannot load model/tokenizer ({exc.__class__.__name__}: {str(exc)[:200]})") from exc
    return tokenizer, model


def run(model_dir: Path, seq_len: int, params: ExportOnnxParams, out_dir: Path, key: str) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    tokenizer, model = load_encoder(Path(model_dir), params.attn_implementation)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise InputError(f"seq_lens: {seq_len} exceeds the model's max_position_embeddings ({max_pos}); lower it")
    embedder = sentence_embedder(model)
    feeds = tokenize(tokenizer, VERIFY_SENTENCES, seq_len)
    example = tuple(torch.from_numpy(feeds[n][:1]) for n in INPUT_NAMES)

    with atomic_output_dir(out_dir) as scratch:
        onnx_path = scratch / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(
                embedder,
                example,
                str(onnx_path),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                opset_version=params.opset,
                do_constant_folding=True,
                dynamo=False,
            )
        onnx.checker.check_model(str(onnx_path))

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        max_abs, min_cos = 0.0, 1.0
        with torch.no_grad():
            for i in range(len(VERIFY_SENTENCES)):
                one = {n: feeds[n][i : i + 1] for n in INPUT_NAMES}
                ref = embedder(*(torch.from_numpy(one[n]) for n in INPUT_NAMES)).numpy()[0]
                got = session.run([OUTPUT_NAME], one)[0][0]
                max_abs = max(max_abs, float(np.abs(ref - got).max()))
                min_cos = min(min_cos, float(np.dot(ref, got) / (np.linalg.norm(ref) * np.linalg.norm(got))))
        if max_abs > params.verify_max_abs_err or min_cos < params.verify_min_cosine:
            raise StageError(
                f"export_onnx seq{seq_len}: ONNX disagrees with torch (max abs err {max_abs:.2e} > "
                f"{params.verify_max_abs_err:.0e} or cosine {min_cos:.6f} < {params.verify_min_cosine}); "
                "try another opset or attn_implementation: eager"
            )
        payload = {
            "seq_len": seq_len,
            "hidden_size": int(model.config.hidden_size),
            "opset": params.opset,
            "verify_max_abs_err": max_abs,
            "verify_min_cosine": min_cos,
            "size_mb": onnx_path.stat().st_size / 1e6,
        }
        write_stamp(scratch, key, payload)
    return payload
