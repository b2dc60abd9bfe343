"""Stage quantize: one quantized artifact per named variant of one ONNX model.

Reads: an ONNX model (static shapes, usually the graph-surgery output) and, for recipes that calibrate,
a calibration npz (the family's sample arrays, [N, L] each). Writes: `<out>/model.onnx` (ONNX Runtime
recipes) or `<out>/model.xml` + `model.bin` (NNCF recipes) and `<out>/stage.json` with what was done:
settings, size, time, and how many quantize nodes the artifact holds, so a variant that silently
quantized nothing is visible.

Variants are data: `quantize.variants` maps a name to a recipe's settings, discriminated by `method`
(one module per recipe in `tasks.recipes`). This stage only dispatches: it checks the inputs, hands the
recipe the calibration feeds and the family's graph facts, and records the result.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.builders.quantize import QuantizeParams, artifact_name, needs_calibration, quantize, tools
from tasks.core.fingerprint import atomic_output_dir, write_stamp
from tasks.families.base import FamilySettings

__all__ = ["QuantizeParams", "artifact_name", "needs_calibration", "run", "tools"]


def run(*, model: Path, calibration: Path | None, variant: str, params: QuantizeParams, family: FamilySettings,
        out_dir: Path, key: str, imports: dict[str, Path] | None = None) -> dict:
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-quant-") as tmp:
        payload = quantize(model, calibration, variant, params, family, scratch, Path(tmp), imports)
        write_stamp(scratch, key, payload)
    return payload
