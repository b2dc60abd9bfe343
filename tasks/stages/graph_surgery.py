"""Stage graph_surgery: make an exported model ready for static quantization and NPUs.

Reads: `model.onnx` from export_onnx (and its `model_dynamic.onnx` when exported). Writes: `<out>/model.onnx`
(and `<out>/model_dynamic.onnx`, the same transformations) and `<out>/stage.json` whose payload reports, per transformation (`tasks.transforms.surgery`, each switchable in `GraphSurgeryParams`), which
nodes changed, the final graph inputs and the fp32 agreement check.

Check: the input and the output model run on ORT CPU on the family's synthetic samples built from the
graph alone (text: token ids with padding at lengths L, L/2, 12 and 3); the minimum cosine between their
outputs must be >= `verify_min_cosine`, else StageError.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.builders.surgery import DYNAMIC_MODEL, MODEL, TOOLS, GraphSurgeryParams, rewrite
from tasks.core.fingerprint import atomic_output_dir, write_stamp
from tasks.families.base import FamilySettings

__all__ = ["MODEL", "TOOLS", "GraphSurgeryParams", "run"]


def run(model: Path, params: GraphSurgeryParams, family: FamilySettings, out_dir: Path, key: str,
        dynamic_model: Path | None = None) -> dict:
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-surgery-") as tmp:
        payload = rewrite(Path(model), params, family, scratch / MODEL, Path(tmp))
        payload["size_mb"] = (scratch / MODEL).stat().st_size / 1e6
        if dynamic_model is not None:
            (Path(tmp) / "dynamic").mkdir()
            dynamic = rewrite(Path(dynamic_model), params, family, scratch / DYNAMIC_MODEL, Path(tmp) / "dynamic",
                              shape=payload["seq_len"])
            payload["dynamic"] = {"model": DYNAMIC_MODEL, "verify_min_cosine": dynamic["verify_min_cosine"],
                                  "transformations": dynamic["transformations"]}
        write_stamp(scratch, key, payload)
    return payload
