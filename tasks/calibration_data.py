"""Stage calibration_data: representative, validated calibration inputs for static quantization.

Reads: the fetched HF folder (tokenizer only) and the text sources named in
`calibration_data.sources` (default: STS-B train + dev sentences, never the test split, which is
the accuracy benchmark). Writes:

- `sentences.csv`: the sampled sentences, in the order calibration consumes them (columns
  `sentence`, `source`, `n_tokens`; `n_tokens` counts the special tokens the model adds).
- `text_pool.csv`: every validated, de-duplicated sentence of the sources (columns `sentence`,
  `source`), in source order and, within a source, file order (step 2 below): the unlabelled text
  the prune stage distils on (~14k sentences for STS-B train + dev).
- `calib_seq{L}.npz` per sequence length L: int64 arrays `input_ids`, `attention_mask`,
  `token_type_ids` of shape [samples, L], the same layout as `tasks.export_onnx.tokenize`.
- `token_lengths.json` / `token_lengths.png`: token-count percentiles and histogram of every
  unique source sentence, with the share of sentences each L would truncate.
- `stage.json`: counts and the statistics above.

Method
------
1. Each source is read as UTF-8 text (`csv`/`tsv`/`jsonl` take the named `column`, `txt` one
   sentence per line, `stsb` both sentences of every pair via `tasks.stsb.read_pairs`). Missing,
   empty, binary (NUL bytes) or non-UTF-8 files, a missing column, or a file whose rows are all
   the same sentence stop the stage with a one-line `InputError` naming the file.
2. Sentences are stripped; blank rows are dropped and repeated sentences removed (first
   occurrence wins, across all sources), then the pool is validated against `CALIBRATION_TEXT`.
3. The pool is shuffled once with `numpy.random.default_rng(seed)`; everything below consumes
   sentences in that order, so the same sources, seed and tokenizer give byte-identical outputs.
4. `pack: false`: row i is sentence i, padded to L (truncated if longer) - what the device sees
   for one short sentence.
   `pack: true`: each row of length L is filled with consecutive sentences of the shuffled pool,
   joined with a space, as long as the next whole sentence still fits in L tokens (including
   [CLS]/[SEP]); the remainder of the row is padding. Rows therefore hold ~L real tokens, so the
   activation ranges of a 512-token model are calibrated on 512-token-like inputs rather than on
   20-token sentences followed by 490 pads, and the few trailing pads keep the attention-mask
   path in the calibrated range. A sentence longer than L fills a row alone (truncated). If the
   pool runs out, the stream restarts from the beginning (reported as `pool_reused`).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pandera.errors
import pandera.pandas as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.errors import InputError, StageError
from tasks.fingerprint import atomic_output_dir, write_stamp

TOOLS = ("transformers", "tokenizers", "numpy", "pandas", "pandera", "matplotlib")
ARRAY_NAMES = ("input_ids", "attention_mask", "token_type_ids")
SENTENCES = "sentences.csv"
TEXT_POOL = "text_pool.csv"
STATS_JSON = "token_lengths.json"
STATS_PNG = "token_lengths.png"
PERCENTILES = (50, 90, 95, 99)

CALIBRATION_TEXT = pa.DataFrameSchema(
    {
        "sentence": pa.Column(
            str,
            [
                pa.Check.str_length(min_value=1),
                pa.Check(lambda s: s.str.strip().str.len() > 0, element_wise=False, error="all-whitespace sentence"),
            ],
            unique=True,
            nullable=False,
        ),
        "source": pa.Column(str, pa.Check.str_length(min_value=1)),
    },
    strict=False,
    coerce=True,
    name="calibration_text",
)


def calib_name(seq_len: int) -> str:
    return f"calib_seq{seq_len}.npz"


class CalibrationSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="text file, relative to the project root")
    format: Literal["csv", "tsv", "jsonl", "txt", "stsb"] = Field(description="how to read `path`")
    column: str | None = Field(None, description="column/key holding the text, for csv, tsv and jsonl")

    @model_validator(mode="after")
    def _column(self) -> CalibrationSource:
        if self.format in ("csv", "tsv", "jsonl") and not self.column:
            raise ValueError(f"{self.path}: format {self.format} needs `column` (the column holding the text)")
        if self.format in ("txt", "stsb") and self.column:
            raise ValueError(f"{self.path}: format {self.format} takes no `column`; remove it")
        return self

    @field_validator("path")
    @classmethod
    def _not_test_split(cls, v: Path) -> Path:
        if v.name.lower().startswith("sts-test"):
            raise ValueError(f"{v}: the STS-B test split is the accuracy benchmark; never calibrate on it")
        return v


_DEFAULT_SOURCES = (
    CalibrationSource(path=Path("../shared/data/stsb/sts-train.csv"), format="stsb"),
    CalibrationSource(path=Path("../shared/data/stsb/sts-dev.csv"), format="stsb"),
)


class CalibrationDataParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[CalibrationSource] = Field(list(_DEFAULT_SOURCES), min_length=1)
    samples: int = Field(300, ge=1, le=100_000, description="calibration rows per sequence length")
    seed: int = Field(0, ge=0)
    pack: bool = Field(True, description="fill each row with consecutive sentences up to ~seq_len tokens")


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"{path}: calibration source not found; fix calibration_data.sources[].path")
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{path}: file is empty; point calibration_data.sources at a file with text")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(f"{path}: UTF-16 text; re-save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{path}: binary file (NUL byte at offset {nul}); calibration needs UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8"
        ) from exc


def _column(frame_columns, column: str, path: Path) -> None:
    if column not in frame_columns:
        found = ", ".join(repr(str(c)) for c in frame_columns) or "none"
        raise InputError(
            f"{path}: no column {column!r} (columns found: {found}); fix calibration_data.sources[].column"
        )


def read_source(source: CalibrationSource, path: Path) -> list[str]:
    """Raw (unstripped, possibly repeated) sentences of one source, in file order."""
    path = Path(path)
    text = _read_text(path)
    if source.format == "stsb":
        from tasks.stsb import read_pairs

        pairs = read_pairs(path)
        return [s for pair in zip(pairs["sentence1"], pairs["sentence2"]) for s in pair]
    if source.format == "txt":
        return text.splitlines()
    if source.format == "jsonl":
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
            if source.column not in obj:
                _column(list(obj), source.column, path)
            value = obj[source.column]
            rows.append("" if value is None else str(value))
        return rows
    sep = "," if source.format == "csv" else "\t"
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InputError(f"{path}: cannot parse as {source.format.upper()} ({first})") from exc
    _column(list(frame.columns), source.column, path)
    return frame[source.column].tolist()


def load_pool(sources: list[CalibrationSource], paths: list[Path]) -> tuple[pd.DataFrame, dict]:
    """All sources read, stripped, de-duplicated (first occurrence wins) and validated."""
    if len(sources) != len(paths):
        raise StageError(f"calibration_data: {len(paths)} source paths for {len(sources)} configured sources")
    frames, per_source = [], []
    for source, path in zip(sources, paths):
        raw = pd.Series(read_source(source, Path(path)), dtype=object).astype(str).str.strip()
        nonblank = raw[raw.str.len() > 0]
        if nonblank.empty:
            raise InputError(f"{path}: no text in the rows read (format {source.format}); check the file and column")
        unique = nonblank.drop_duplicates()
        if len(unique) < 2 and len(nonblank) > 1:
            raise InputError(
                f"{path}: all {len(nonblank)} rows are the same sentence; calibration needs varied text"
            )
        per_source.append(
            {
                "path": Path(path).as_posix(),
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
        raise InputError(f"calibration sources: {str(exc).splitlines()[0]}") from exc
    info = {"sources": per_source, "unique_sentences": int(len(pool)), "cross_source_duplicates": before - len(pool)}
    return pool, info


# --------------------------------------------------------------------------- rows


def _pack_rows(
    lengths: np.ndarray, order: np.ndarray, seq_len: int, specials: int, rows: int
) -> tuple[list[list[int]], int]:
    """Greedy packing of whole sentences (pool indices, in `order`) into `rows` rows of <= seq_len tokens.

    Returns the rows and how many stream positions were consumed (> len(order) means the pool was reused).
    """
    budget = seq_len - specials
    out, pos = [], 0
    for _ in range(rows):
        row, used = [], 0
        while True:
            idx = int(order[pos % len(order)])
            need = int(lengths[idx])  # joining with a space adds no token (WordPiece, and ~none in BPE)
            if row and used + need > budget:
                break
            row.append(idx)
            used += need
            pos += 1
            if used >= budget:
                break
        out.append(row)
    return out, pos


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed zip timestamps, so identical arrays give identical bytes (stable hashes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _token_stats(n_tokens: np.ndarray, seq_lens: list[int]) -> dict:
    top = int(n_tokens.max())
    width = max(1, math.ceil((top + 1) / 50))
    edges = np.arange(0, top + width + 1, width)
    counts, edges = np.histogram(n_tokens, bins=edges)
    return {
        "sentences": int(len(n_tokens)),
        "counts_special_tokens": True,
        "mean": float(n_tokens.mean()),
        **{f"p{p}": float(np.percentile(n_tokens, p)) for p in PERCENTILES},
        "max": top,
        "histogram": {"bin_edges": edges.astype(int).tolist(), "counts": counts.astype(int).tolist()},
        "truncated_share": {str(L): float((n_tokens > L).mean()) for L in seq_lens},
    }


def _plot(path: Path, n_tokens: np.ndarray, stats: dict, seq_lens: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.hist(n_tokens, bins=stats["histogram"]["bin_edges"], color="#4c72b0")
    for L in seq_lens:
        ax.axvline(L, color="#c44e52", linestyle="--", linewidth=1)
        label = f" L={L}\n {stats['truncated_share'][str(L)]:.1%} cut"
        ax.text(L, ax.get_ylim()[1] * 0.95, label, va="top", fontsize=8)
    ax.set_xlim(0, max([stats["max"], *seq_lens]) * 1.05)
    ax.set_xlabel("tokens per sentence (incl. special tokens)")
    ax.set_ylabel("sentences")
    ax.set_title(f"calibration pool: {stats['sentences']} sentences, p50 {stats['p50']:.0f}, p99 {stats['p99']:.0f}")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def run(
    model_dir: Path,
    sources: list[Path],
    seq_lens: list[int],
    params: CalibrationDataParams,
    out_dir: Path,
    key: str,
) -> dict:
    from transformers import AutoTokenizer

    from tasks.export_onnx import tokenize

    if not seq_lens or any(L <= 2 for L in seq_lens):
        raise InputError(f"seq_lens: {seq_lens}: every sequence length must be > 2 tokens")
    pool, info = load_pool(params.sources, [Path(p) for p in sources])
    if len(pool) < params.samples:
        raise InputError(
            f"calibration sources: only {len(pool)} unique sentences for calibration_data.samples={params.samples}; "
            "add sources or lower samples"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{model_dir}: cannot load tokenizer ({exc.__class__.__name__}); pass the fetched HF folder"
        ) from exc

    sentences = pool["sentence"].tolist()
    specials = int(tokenizer.num_special_tokens_to_add(pair=False))
    bare = np.array([len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    n_tokens = bare + specials
    order = np.random.default_rng(params.seed).permutation(len(pool))

    stats = _token_stats(n_tokens, seq_lens)
    per_len, consumed, arrays_by_len = {}, params.samples, {}
    for L in seq_lens:
        if params.pack:
            rows, end = _pack_rows(bare, order, L, specials, params.samples)
            texts = [" ".join(sentences[i] for i in row) for row in rows]
            consumed, reused, per_row = max(consumed, min(end, len(pool))), end > len(pool), [len(r) for r in rows]
        else:
            texts, reused, per_row = [sentences[i] for i in order[: params.samples]], False, [1] * params.samples
        arrays = tokenize(tokenizer, texts, L)
        real = arrays["attention_mask"].sum(axis=1)
        arrays_by_len[L] = arrays
        per_len[str(L)] = {
            "file": calib_name(L),
            "rows": int(len(texts)),
            "sentences_per_row_mean": float(np.mean(per_row)),
            "real_tokens_mean": float(real.mean()),
            "real_tokens_min": int(real.min()),
            "fill_ratio": float(real.mean() / L),
            "rows_with_padding": int((real < L).sum()),
            "pool_reused": bool(reused),
        }

    used = order[:consumed]
    sample = pd.DataFrame(
        {
            "sentence": [sentences[i] for i in used],
            "source": pool["source"].to_numpy()[used],
            "n_tokens": n_tokens[used],
        }
    )
    try:
        sample = CALIBRATION_TEXT.validate(sample, lazy=False)
    except (pandera.errors.SchemaError, ValueError) as exc:  # the pool was valid, so this is a bug
        raise StageError(f"calibration_data: sampled sentences fail {CALIBRATION_TEXT.name}: {exc}") from exc

    with atomic_output_dir(out_dir) as scratch:
        sample.to_csv(scratch / SENTENCES, index=False, lineterminator="\n")
        pool[["sentence", "source"]].to_csv(scratch / TEXT_POOL, index=False, lineterminator="\n")
        for L, arrays in arrays_by_len.items():
            _save_npz(scratch / calib_name(L), {n: arrays[n].astype(np.int64) for n in ARRAY_NAMES})
        (scratch / STATS_JSON).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _plot(scratch / STATS_PNG, n_tokens, stats, seq_lens)
        payload = {
            "samples": params.samples,
            "seed": params.seed,
            "pack": params.pack,
            "sentences_sampled": int(len(sample)),
            **info,
            "seq_lens": per_len,
            "token_lengths": {k: v for k, v in stats.items() if k != "histogram"},
        }
        write_stamp(scratch, key, payload)
    return payload


def load_calibration(path: Path) -> dict[str, np.ndarray]:
    """Read a `calib_seq{L}.npz` written by this stage (int64 arrays named like the ONNX inputs)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {n: data[n] for n in ARRAY_NAMES}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a calibration npz with {list(ARRAY_NAMES)} ({exc.__class__.__name__})") from exc
    return arrays
