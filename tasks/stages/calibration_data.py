"""Stage calibration_data: representative, validated calibration inputs for static quantization.

Reads: the fetched model folder (its tokenizer or preprocess.json), the text sources in
`calibration_data.sources` (or the image sources in `calibration_data.images`) and the evaluation sets (no
pool row may be one of their texts or images: the same file is refused by config validation, the same rows or
image contents here). Writes the text pool, the sampled sentences, one `calib_seq{L}.npz` (and
`calib_rows_seq{L}.npz`, one real input per row) per length and token-length statistics; for images the
image pool, the sampled images and one `calib_seq{S}.npz` per image size; as `tasks.builders.calibration` describes.
"""

from __future__ import annotations

from pathlib import Path

from tasks.builders.calibration import IMAGE_POOL, TEXT_POOL, TOOLS, CalibrationDataParams, calib_name, make
from tasks.core.fingerprint import atomic_output_dir, write_stamp
from tasks.data.evaluation import EvaluationParams
from tasks.families.base import FamilySettings

__all__ = ["IMAGE_POOL", "TEXT_POOL", "TOOLS", "CalibrationDataParams", "calib_name", "run"]


def run(
    model_dir: Path,
    sources: list[Path],
    seq_lens: list[int],
    params: CalibrationDataParams,
    family: FamilySettings,
    evaluation: EvaluationParams,
    out_dir: Path,
    key: str,
) -> dict:
    calibration = make(model_dir, sources, seq_lens, params, family, evaluation)
    with atomic_output_dir(out_dir) as scratch:
        calibration.write(scratch, seq_lens)
        write_stamp(scratch, key, calibration.payload)
    return calibration.payload
