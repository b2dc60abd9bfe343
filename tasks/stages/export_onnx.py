"""Stage export_onnx: one static-shape ONNX model per shape (sequence length for text).

Reads: a model folder (the fetched one, or a pruned copy). Writes: `<out>/model.onnx`, the family's export
module traced at [1, L]: inputs as the family names them (text: `input_ids`, `attention_mask` and, for
models with token types, `token_type_ids`, int64 [1, L]); one output (a sentence embedder's `embedding`,
pooled and normalised inside the graph, so the device runs the whole model; a classifier's `logits`) and
`<out>/stage.json` with the agreement between ONNX Runtime and torch on the family's check samples. With
`export_onnx.dynamic`, also `<out>/model_dynamic.onnx`: the same module with a free shape axis (text: any
length up to L), checked on each sample at its own length, for the variants built with `shape: dynamic`.
"""

from __future__ import annotations

from pathlib import Path

from tasks.builders.export import DYNAMIC_MODEL, MODEL, TOOLS, ExportOnnxParams, export
from tasks.core.fingerprint import atomic_output_dir, write_stamp
from tasks.families.base import FamilySettings

__all__ = ["DYNAMIC_MODEL", "MODEL", "TOOLS", "ExportOnnxParams", "run"]


def run(model_dir: Path, seq_len: int, params: ExportOnnxParams, family: FamilySettings, out_dir: Path, key: str) -> dict:
    with atomic_output_dir(out_dir) as scratch:
        payload = export(model_dir, seq_len, params, family, scratch / MODEL,
                         scratch / DYNAMIC_MODEL if params.dynamic else None)
        payload["size_mb"] = (scratch / MODEL).stat().st_size / 1e6
        write_stamp(scratch, key, payload)
    return payload
