"""Text sources named in params (calibration text, distillation text, the inputs a deployment will see).

Each source is read as UTF-8 text: `csv`/`tsv`/`jsonl` take the named `column`, `json` the `column` key of
every record (a JSON array of objects, or an object whose values are objects), `txt` one text per line,
`stsb` both sentences of every pair (`tasks.data.stsb.read_pairs`). `split_sentences` cuts paragraphs into
sentences first. Missing, empty, binary (NUL bytes),
UTF-16 or non-UTF-8 files, a missing column, or a file whose rows are all the same text stop with a
one-line `InputError` naming the file. `load_pool` strips, drops blank rows, removes repeats (first
occurrence wins, across sources) and validates the pool against `CALIBRATION_TEXT`.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pandera.errors
from pydantic import Field, model_validator

from tasks.core.errors import InputError, StageError
from tasks.core.fingerprint import file_sha256
from tasks.core.params import StrictParams
from tasks.core.schemas import CALIBRATION_TEXT
from tasks.data.stsb import read_pairs

# A sentence ends at . ! or ? followed by space and a capital, digit, quote or bracket. Simple on purpose:
# an abbreviation ("U.S. Army") splits a sentence in two, which costs a text pool nothing.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


class TextSource(StrictParams):
    path: Path = Field(description="text file, relative to the project root")
    format: Literal["csv", "tsv", "jsonl", "json", "txt", "stsb"] = Field(description="how to read `path`")
    column: str | None = Field(None, description="column/key holding the text, for csv, tsv, jsonl and json")
    split_sentences: bool = Field(False, description="cut each text into sentences (for paragraphs, documents)")
    provenance: str | None = Field(None, description="where the text comes from and its licence (recorded in the output)")

    @model_validator(mode="after")
    def _column(self) -> TextSource:
        if self.format in ("csv", "tsv", "jsonl", "json") and not self.column:
            raise ValueError(f"{self.path}: format {self.format} needs `column` (the column holding the text)")
        if self.format in ("txt", "stsb") and self.column:
            raise ValueError(f"{self.path}: format {self.format} takes no `column`; remove it")
        return self


def read_text_file(path: Path, what: str = "text source") -> str:
    """The file as UTF-8 text; InputError naming the file when it is missing, empty, binary or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found; fix its path in params.yaml")
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{path}: file is empty; point the {what} at a file with text")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(f"{path}: UTF-16 text; re-save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{path}: binary file (NUL byte at offset {nul}); a {what} must be UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from exc


def require_column(frame_columns, column: str, path: Path) -> None:
    if column not in frame_columns:
        found = ", ".join(repr(str(c)) for c in frame_columns) or "none"
        raise InputError(f"{path}: no column {column!r} (columns found: {found}); fix the column name in params.yaml")


def read_table(path: Path, fmt: Literal["csv", "tsv", "jsonl"], columns: list[str], what: str) -> pd.DataFrame:
    """The named columns of a csv/tsv/jsonl file as strings (missing values ""), in file order."""
    path = Path(path)
    text = read_text_file(path, what)
    if fmt == "jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: not a JSON object ({exc.msg}); one JSON object per line") from exc
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for column in columns:
                if column not in obj:
                    require_column(list(obj), column, path)
            rows.append({c: "" if obj[c] is None else str(obj[c]) for c in columns})
        return pd.DataFrame(rows, columns=columns)
    try:
        frame = pd.read_csv(io.StringIO(text), sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InputError(f"{path}: cannot parse as {fmt.upper()} ({first})") from exc
    for column in columns:
        require_column(list(frame.columns), column, path)
    return frame[columns]


def read_json_records(path: Path, key: str) -> list[str]:
    """The `key` of every record of a JSON array of objects, or of an object whose values are objects."""
    text = read_text_file(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); fix the file or its format") from exc
    records = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{path}: expected an array of objects or an object of objects; use format jsonl or txt")
    missing = sum(1 for r in records if key not in r)
    if missing == len(records):
        found = sorted({k for r in records[:20] for k in r})
        raise InputError(f"{path}: no record has key {key!r} (keys found: {found}); fix the column in params.yaml")
    return ["" if r.get(key) is None else str(r.get(key)) for r in records]


def split_sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_END.split(text) if s.strip()]


def read_source(source: TextSource, path: Path) -> list[str]:
    """Raw (unstripped, possibly repeated) texts of one source, in file order."""
    path = Path(path)
    if source.format == "stsb":
        read_text_file(path)
        pairs = read_pairs(path)
        texts = [s for pair in zip(pairs["sentence1"], pairs["sentence2"]) for s in pair]
    elif source.format == "txt":
        texts = read_text_file(path).splitlines()
    elif source.format == "json":
        texts = read_json_records(path, source.column)
    else:
        texts = read_table(path, source.format, [source.column], "text source")[source.column].tolist()
    return [s for t in texts for s in split_sentences(t)] if source.split_sentences else texts


def distinct_texts(source: TextSource, path: Path, what: str, field: str) -> list[str]:
    """The distinct non-blank texts of `path` (stripped, first occurrence order); InputError naming `what` the
    text is for and the params `field` to fix when the file is missing or holds none."""
    if not Path(path).is_file():
        raise InputError(f"{path}: {what} not found; fix {field}.path")
    texts = list(dict.fromkeys(t.strip() for t in read_source(source, Path(path)) if t.strip()))
    if not texts:
        raise InputError(f"{path}: no text for {what}; fix {field}")
    return texts


def load_pool(sources: list[TextSource], paths: list[Path]) -> tuple[pd.DataFrame, dict]:
    """All sources read, stripped, de-duplicated (first occurrence wins) and validated."""
    if len(sources) != len(paths):
        raise StageError(f"text pool: {len(paths)} source paths for {len(sources)} configured sources")
    frames, per_source = [], []
    for source, path in zip(sources, paths):
        raw = pd.Series(read_source(source, Path(path)), dtype=object).astype(str).str.strip()
        nonblank = raw[raw.str.len() > 0]
        if nonblank.empty:
            raise InputError(f"{path}: no text in the rows read (format {source.format}); check the file and column")
        unique = nonblank.drop_duplicates()
        if len(unique) < 2 and len(nonblank) > 1:
            raise InputError(f"{path}: all {len(nonblank)} rows are the same sentence; calibration needs varied text")
        per_source.append(
            {
                "path": Path(path).as_posix(),
                "sha256": file_sha256(path),
                "provenance": source.provenance,
                "split_sentences": source.split_sentences,
                "rows": int(len(raw)),
                "blank": int(len(raw) - len(nonblank)),
                "unique": int(len(unique)),
            }
        )
        frames.append(pd.DataFrame({"sentence": unique.to_numpy(), "source": Path(path).name}))
    pool = pd.concat(frames, ignore_index=True)
    before = len(pool)
    pool = pool.drop_duplicates("sentence", keep="first").reset_index(drop=True)
    try:
        pool = CALIBRATION_TEXT.validate(pool, lazy=False)
    except (pandera.errors.SchemaError, ValueError) as exc:
        raise InputError(f"text sources: {str(exc).splitlines()[0]}") from exc
    info = {"sources": per_source, "unique_sentences": int(len(pool)), "cross_source_duplicates": before - len(pool)}
    return pool, info


class MixSample(StrictParams):
    """Which of the user's inputs bundles are timed on (the bundle stage, then the race, on the same sample)."""

    mix_samples: int = Field(300, ge=10, description="inputs sampled from report.seq_len_choice.text for the mix")
    seed: int = 0


def mix_sample(source: TextSource, path: Path, count: int, seed: int) -> list[str]:
    """A seeded sample of the distinct non-blank inputs of `path` (all of them when there are fewer): the user's
    inputs that bundles are timed on (the bundle stage, then the race, on the same sample)."""
    texts = distinct_texts(source, Path(path), "the inputs to time bundles on", "report.seq_len_choice.text")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(texts), size=min(count, len(texts)), replace=False)
    return [texts[i] for i in sorted(picked)]
