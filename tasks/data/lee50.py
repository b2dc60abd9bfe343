"""Reader for the Lee, Pincombe & Welsh (2005) document-similarity set ("Lee50") as gensim ships it.

A folder (`infra/data/fetch.sh` writes `data/lee50/`) holding `lee.cor` (50 short ABC news documents, one per
line, Latin-1) and `similarities0-1.txt` (a 50 x 50 whitespace matrix of mean human judgements, 0.2-1.0,
only the upper triangle filled). The pairs are the upper triangle above the diagonal, row by row: 1,225
pairs over 50 texts (what gensim's own test of the set does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pandera.errors

from tasks.core.errors import InputError
from tasks.core.schemas import SENTENCE_PAIRS, describe

DOCUMENTS = "lee.cor"
SIMILARITIES = "similarities0-1.txt"


def _documents(folder: Path) -> list[str]:
    path = folder / DOCUMENTS
    if not path.is_file():
        raise InputError(f"{path}: Lee50 documents not found; run `bash infra/data/fetch.sh` or fix the path")
    # Latin-1 as shipped (a pound sign is byte 0xa3); every byte decodes, so there is no decode error to catch.
    docs = [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
    if not docs:
        raise InputError(f"{path}: no documents")
    return docs


def _similarities(folder: Path, n: int) -> np.ndarray:
    path = folder / SIMILARITIES
    if not path.is_file():
        raise InputError(f"{path}: Lee50 similarity matrix not found; run `bash infra/data/fetch.sh` or fix the path")
    try:
        matrix = np.loadtxt(path, dtype=float, ndmin=2)
    except ValueError as exc:
        raise InputError(f"{path}: not a whitespace-separated matrix of numbers ({exc})") from exc
    if matrix.shape != (n, n):
        raise InputError(f"{path}: a {matrix.shape[0]} x {matrix.shape[1]} matrix for {n} documents in {DOCUMENTS}")
    return matrix


def read_pairs(folder: Path, limit: int | None = None) -> pd.DataFrame:
    """A validated frame with columns score, sentence1, sentence2: every document pair i < j, row by row."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; a Lee50 set is the folder holding {DOCUMENTS} and {SIMILARITIES}")
    docs = _documents(folder)
    matrix = _similarities(folder, len(docs))
    left, right = np.triu_indices(len(docs), 1)
    frame = pd.DataFrame(
        {"score": matrix[left, right], "sentence1": [docs[i] for i in left], "sentence2": [docs[j] for j in right]}
    )
    try:
        frame = SENTENCE_PAIRS.validate(frame, lazy=False)
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        raise InputError(f"{folder / SIMILARITIES}: {describe(exc)}") from exc
    return frame.head(limit) if limit else frame
