"""Reader for the STS Benchmark files as distributed (see ../shared/data/README.md).

Tab-separated, no header, CRLF, raw double quotes (so quoting is disabled), and some lines carry
two extra trailing fields that are ignored.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.errors

from tasks.errors import InputError
from tasks.schemas import STSB_PAIRS, describe

SPLITS = ("train", "dev", "test")


def split_path(stsb_dir: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(split)
    return Path(stsb_dir) / f"sts-{split}.csv"


def read_pairs(path: Path, limit: int | None = None) -> pd.DataFrame:
    """Return a validated frame with columns score, sentence1, sentence2."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: STS-B file not found; set data.stsb_dir to the folder holding sts-*.csv")
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


def unique_sentences(pairs: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Unique sentences in pair order (s1, s2, s1, s2, ...) and each pair's two indices into them.

    Pair order makes the unique sentences of the first N pairs a prefix of those of all pairs, so a
    reference embedded on a prefix lines up with any benchmark row by row.
    """
    sentences = list(dict.fromkeys(s for pair in zip(pairs["sentence1"], pairs["sentence2"]) for s in pair))
    index = {s: i for i, s in enumerate(sentences)}
    return sentences, pairs["sentence1"].map(index).to_numpy(), pairs["sentence2"].map(index).to_numpy()
