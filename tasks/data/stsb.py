"""Reader for the STS Benchmark files as distributed (see ../shared/data/README.md).

Tab-separated, no header, CRLF, raw double quotes (so quoting is disabled), and some lines carry
two extra trailing fields that are ignored.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pandera.errors

from tasks.core.errors import InputError
from tasks.core.schemas import STSB_PAIRS, describe


def read_pairs(path: Path, limit: int | None = None) -> pd.DataFrame:
    """Return a validated frame with columns score, sentence1, sentence2."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: STS-B file not found; fix its path in params.yaml (relative to the project root)")
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            for lineno, fields in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
                if len(fields) < 7:
                    raise InputError(f"{path}:{lineno}: expected 7 tab-separated fields, got {len(fields)}")
                rows.append((fields[4], fields[5].strip(), fields[6].strip()))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not rows:
        raise InputError(f"{path}: no sentence pairs")
    frame = pd.DataFrame(rows, columns=["score", "sentence1", "sentence2"])
    try:
        frame = STSB_PAIRS.validate(frame, lazy=False)
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        raise InputError(f"{path}: {describe(exc)}") from exc
    return frame.head(limit) if limit else frame
