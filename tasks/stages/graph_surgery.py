"""Stage graph_surgery: make an exported model ready for static quantization and NPUs.

Reads: `model.onnx` from export_onnx. Writes: `<out>/model.onnx` and `<out>/stage.json` whose payload
reports, per transformation (`tasks.transforms.surgery`, each switchable in `GraphSurgeryParams`), which
nodes changed, the final graph inputs and the fp32 agreement check.

Check: the input and the output model run on ORT CPU on the family's synthetic samples built from the
graph alone (text: token ids with padding at lengths L, L/2, 12 and 3); the minimum cosine between their
outputs must be >= `verify_min_cosine`, else StageError.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.builders.surgery import MODEL, TOOLS, GraphSurgeryParams, rewrite
from tasks.core.fingerprint import atomic_output_dir, write_stamp
from tasks.families.base import FamilySettings

__all__ = ["MODEL", "TOOLS", "GraphSurgeryParams", "run"]


def run(model: Path, params: GraphSurgeryParams, family: FamilySettings, out_dir: Path, key: str) -> dict:
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-surgery-") as tmp:
        payload = rewrite(Path(model), params, family, scratch / MODEL, Path(tmp))
        payload["size_mb"] = (scratch / MODEL).stat().st_size / 1e6
        write_stamp(scratch, key, payload)
    return payload
