"""Calibration data: representative, validated calibration inputs for static quantization.

Reads: the fetched model folder (its preprocessor only: the tokenizer) and the text sources named in
`calibration_data.sources` (never an evaluation set: config validation refuses that). Writes:

- `sentences.csv`: the sampled sentences, in the order calibration consumes them (columns
  `sentence`, `source`, `n_tokens`; `n_tokens` counts the special tokens the model adds).
- `text_pool.csv`: every validated, de-duplicated sentence of the sources (columns `sentence`,
  `source`), in source order and, within a source, file order (step 2 below): the unlabelled text
  the prune stage distils on (~14k sentences for STS-B train + dev).
- `calib_seq{L}.npz` per sequence length L: int64 arrays `input_ids`, `attention_mask`,
  `token_type_ids` of shape [samples, L], the family's samples (`ModelFamily.samples`).
- `calib_rows_seq{L}.npz` per L: the first `samples` sentences of the shuffled pool, one per row padded to
  L (never packed) plus `row_lengths`: what variants with a free shape axis (`shape: dynamic`) calibrate on,
  each row cut to its own length, as a deployed input runs.
- `token_lengths.json` / `token_lengths.png`: token-count percentiles and histogram of every
  unique source sentence, with the share of sentences each L would truncate.
- `stage.json`: counts and the statistics above.

Method
------
1.-2. The sources are read and pooled by `tasks.data.text.load_pool` (UTF-8 checks, stripped,
   blank rows dropped, repeats removed across sources, validated against `CALIBRATION_TEXT`).
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

Images (a family whose modality is "image"; `calibration_data.images`: folders or CSVs of image paths)
-------------------------------------------------------------------------------------------------------
Every image of the sources is listed and hashed (sha256 of its bytes); repeats are removed by content (first
occurrence wins, across sources), and an image whose content is an image of an evaluation set stops the
stage. The pool is shuffled with `default_rng(seed)` and the first `samples` images are taken. Writes:
`calib_seq{S}.npz` per image size S (float32 `pixel_values` [samples, 3, S, S]: the family's samples, with the
model folder's preprocess.json), `images.csv` (the sampled images: path, sha256, source, width, height) and
`image_pool.csv` (the whole pool: path, sha256, source), and `stage.json` (counts and every sampled sha256).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.errors
from pydantic import Field, model_validator

from tasks.core.errors import InputError, StageError
from tasks.core.calibration_arrays import ROW_LENGTHS
from tasks.core.params import StrictParams
from tasks.core.schemas import CALIBRATION_TEXT
from tasks.data import images as image_files
from tasks.data.evaluation import IMAGE_SETS, EvaluationParams, image_hashes, refuse_evaluated_text
from tasks.data.text import TextSource, load_pool
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings

TOOLS = ("transformers", "tokenizers", "numpy", "pandas", "pandera", "matplotlib")
ARRAY_NAMES = ("input_ids", "attention_mask", "token_type_ids")
SENTENCES = "sentences.csv"
TEXT_POOL = "text_pool.csv"
IMAGE_POOL = "image_pool.csv"
IMAGES = "images.csv"
STATS_JSON = "token_lengths.json"
STATS_PNG = "token_lengths.png"
PERCENTILES = (50, 90, 95, 99)


def calib_name(seq_len: int, rows_of_one: bool = False) -> str:
    """The calibration npz at one length: rows as `pack` makes them, or one real input per row (padded to the
    length, with `row_lengths`) for variants with a free shape axis, which calibrate each input at its own length."""
    return f"calib_rows_seq{seq_len}.npz" if rows_of_one else f"calib_seq{seq_len}.npz"


class CalibrationDataParams(StrictParams):
    sources: list[TextSource] = Field([], description="text to calibrate on (text families); never an evaluation set")
    images: list[image_files.ImageSource] = Field(
        [], description="images to calibrate on (image families): folders or CSVs of paths; never evaluation images"
    )
    samples: int = Field(300, ge=1, le=100_000, description="calibration rows per sequence length (image size)")
    seed: int = Field(0, ge=0)
    pack: bool = Field(True, description="text: fill each row with consecutive sentences up to ~seq_len tokens")

    @model_validator(mode="after")
    def _one_kind(self) -> CalibrationDataParams:
        if bool(self.sources) == bool(self.images):
            raise ValueError("give either sources (text) or images (image folders or CSVs of paths), one of them")
        return self

    def inputs(self) -> list[TextSource | image_files.ImageSource]:
        """The sources calibration reads: text sources or image sources."""
        return list(self.sources or self.images)


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


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
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


@dataclass
class Calibration:
    """Everything the calibration_data stage writes, in memory."""

    pool: pd.DataFrame
    sample: pd.DataFrame
    arrays: dict[int, dict[str, np.ndarray]]
    single: dict[int, dict[str, np.ndarray]]
    """Per length: one sampled input per row (with ROW_LENGTHS), for dynamic-shape variants."""
    n_tokens: np.ndarray
    stats: dict
    payload: dict

    def write(self, folder: Path, seq_lens: list[int]) -> None:
        self.sample.to_csv(folder / SENTENCES, index=False, lineterminator="\n")
        self.pool[["sentence", "source"]].to_csv(folder / TEXT_POOL, index=False, lineterminator="\n")
        for L, arrays in self.arrays.items():
            save_npz(folder / calib_name(L), {n: arrays[n].astype(np.int64) for n in ARRAY_NAMES})
        for L, arrays in self.single.items():
            save_npz(folder / calib_name(L, rows_of_one=True),
                     {n: arrays[n].astype(np.int64) for n in (*ARRAY_NAMES, ROW_LENGTHS)})
        (folder / STATS_JSON).write_text(json.dumps(self.stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _plot(folder / STATS_PNG, self.n_tokens, self.stats, seq_lens)


@dataclass
class ImageCalibration:
    """Everything the calibration_data stage writes for an image family, in memory."""

    pool: pd.DataFrame
    sample: pd.DataFrame
    arrays: dict[int, dict[str, np.ndarray]]
    payload: dict

    def write(self, folder: Path, seq_lens: list[int]) -> None:
        self.sample.to_csv(folder / IMAGES, index=False, lineterminator="\n")
        self.pool.to_csv(folder / IMAGE_POOL, index=False, lineterminator="\n")
        for size, arrays in self.arrays.items():
            save_npz(folder / calib_name(size), {n: a.astype(np.float32) for n, a in arrays.items()})


def refuse_evaluated_images(pool: pd.DataFrame, evaluation: EvaluationParams) -> None:
    """InputError when an image of the pool (columns path, sha256, source) has the content of an evaluation image."""
    for eval_set in evaluation.sets:
        if not isinstance(eval_set, IMAGE_SETS):
            continue
        evaluated = image_hashes(eval_set)
        shared = pool[pool["sha256"].isin(set(evaluated))]
        if not shared.empty:
            first = shared.iloc[0]
            raise InputError(
                f"{first['source']}: {len(shared)} calibration images are images of evaluation set {eval_set.name!r} "
                f"(e.g. {first['path']} is {evaluated[first['sha256']]}); never calibrate on what is evaluated: "
                "remove them or use another source"
            )


def make_images(model_dir: Path, sources: list[Path], seq_lens: list[int], params: CalibrationDataParams, impl,
                evaluation: EvaluationParams | None) -> ImageCalibration:
    """The image pool (de-duplicated by content, checked against the evaluation images), the seeded sample and
    the calibration arrays at every image size."""
    if len(sources) != len(params.images):
        raise StageError(f"calibration images: {len(sources)} source paths for {len(params.images)} configured sources")
    rows, per_source = [], []
    for source, path in zip(params.images, sources):
        listed = image_files.list_images(source, Path(path))
        rows += [(str(p), image_files.image_sha256(p), Path(path).as_posix()) for p in listed]
        per_source.append({"path": Path(path).as_posix(), "format": source.format, "provenance": source.provenance,
                           "images": len(listed)})
    listed = pd.DataFrame(rows, columns=["path", "sha256", "source"])
    pool = listed.drop_duplicates("sha256", keep="first").reset_index(drop=True)
    if evaluation is not None:
        refuse_evaluated_images(pool, evaluation)
    if len(pool) < params.samples:
        raise InputError(
            f"calibration_data.images: only {len(pool)} distinct images for calibration_data.samples={params.samples}; "
            "add images or lower samples"
        )
    order = np.random.default_rng(params.seed).permutation(len(pool))[: params.samples]
    sample = pool.iloc[order].reset_index(drop=True)
    sizes = [image_files.read_image(Path(p)).size for p in sample["path"]]
    sample = sample.assign(width=[w for w, _ in sizes], height=[h for _, h in sizes])
    preprocess = impl.load_preprocessor(Path(model_dir))
    arrays = {size: impl.samples(preprocess, sample["path"].tolist(), size) for size in seq_lens}
    payload = {
        "samples": params.samples,
        "seed": params.seed,
        "sources": per_source,
        "images_listed": int(len(listed)),
        "unique_images": int(len(pool)),
        "duplicates": int(len(listed) - len(pool)),
        "image_sizes": {str(s): {"file": calib_name(s), "rows": params.samples} for s in seq_lens},
        "sampled_sha256": sample["sha256"].tolist(),
    }
    return ImageCalibration(pool, sample, arrays, payload)


def make(model_dir: Path, sources: list[Path], seq_lens: list[int], params: CalibrationDataParams,
         family: FamilySettings, evaluation: EvaluationParams | None) -> Calibration | ImageCalibration:
    """`evaluation`: the sets no pool row may come from (None: not checked, for latency-only calibration
    made from a pool that was checked when the calibration_data stage made it)."""
    impl = FAMILIES.get(family.name)
    if impl.modality == "image":
        return make_images(model_dir, sources, seq_lens, params, impl, evaluation)
    if not seq_lens or any(L <= 2 for L in seq_lens):
        raise InputError(f"seq_lens: {seq_lens}: every sequence length must be > 2 tokens")
    pool, info = load_pool(params.sources, [Path(p) for p in sources])
    if evaluation is not None:
        refuse_evaluated_text(pool, evaluation, "calibration and distillation text")
    if len(pool) < params.samples:
        raise InputError(
            f"calibration sources: only {len(pool)} unique sentences for calibration_data.samples={params.samples}; "
            "add sources or lower samples"
        )
    tokenizer = impl.load_preprocessor(Path(model_dir))

    sentences = pool["sentence"].tolist()
    specials = int(tokenizer.num_special_tokens_to_add(pair=False))
    bare = np.array([len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    n_tokens = bare + specials
    order = np.random.default_rng(params.seed).permutation(len(pool))

    stats = _token_stats(n_tokens, seq_lens)
    per_len, consumed, arrays_by_len, single_by_len = {}, params.samples, {}, {}
    singles = [sentences[i] for i in order[: params.samples]]
    for L in seq_lens:
        single_by_len[L] = {**impl.samples(tokenizer, singles, L),
                            ROW_LENGTHS: np.minimum(n_tokens[order[: params.samples]], L)}
        if params.pack:
            rows, end = _pack_rows(bare, order, L, specials, params.samples)
            texts = [" ".join(sentences[i] for i in row) for row in rows]
            consumed, reused, per_row = max(consumed, min(end, len(pool))), end > len(pool), [len(r) for r in rows]
        else:
            texts, reused, per_row = [sentences[i] for i in order[: params.samples]], False, [1] * params.samples
        arrays = impl.samples(tokenizer, texts, L)
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

    payload = {
        "samples": params.samples,
        "seed": params.seed,
        "pack": params.pack,
        "sentences_sampled": int(len(sample)),
        **info,
        "seq_lens": per_len,
        "token_lengths": {k: v for k, v in stats.items() if k != "histogram"},
    }
    return Calibration(pool, sample, arrays_by_len, single_by_len, n_tokens, stats, payload)
