"""Stage calibration_data: representative, validated calibration inputs for static quantization.

Reads: the fetched model folder (its tokenizer) and the text sources in `calibration_data.sources` (never an
evaluation set: config validation refuses that). Writes the text pool, the sampled sentences, one
`calib_seq{L}.npz` per length and token-length statistics, as `tasks.builders.calibration` describes.
"""

from __future__ import annotations

from pathlib import Path

from tasks.builders.calibration import TEXT_POOL, TOOLS, CalibrationDataParams, calib_name, make
from tasks.core.fingerprint import atomic_output_dir, write_stamp
from tasks.families.base import FamilySettings

__all__ = ["TEXT_POOL", "TOOLS", "CalibrationDataParams", "calib_name", "run"]


def run(
    model_dir: Path,
    sources: list[Path],
    seq_lens: list[int],
    params: CalibrationDataParams,
    family: FamilySettings,
    out_dir: Path,
    key: str,
) -> dict:
    calibration = make(model_dir, sources, seq_lens, params, family)
    with atomic_output_dir(out_dir) as scratch:
        calibration.write(scratch, seq_lens)
        write_stamp(scratch, key, calibration.payload)
    return calibration.payload
