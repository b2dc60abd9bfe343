"""calibration_data: sources read and validated, deterministic sampling, packed rows fill the length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from tasks.calibration_data import (
    CALIBRATION_TEXT,
    CalibrationDataParams,
    CalibrationSource,
    calib_name,
    load_calibration,
    run,
)
from tasks.errors import InputError
from tiny_models import WORDS


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + "." for _ in range(n)]


def _write_stsb(path: Path, pairs: int, seed: int) -> Path:
    """STS-B distribution format: tab-separated, no header, CRLF, raw quotes, some extra fields."""
    s = _sentences(2 * pairs, seed)
    lines = []
    for i in range(pairs):
        extra = "\tnote\tmore" if i % 7 == 0 else ""
        score = f"{(i % 6) * 0.8:.3f}"
        fields = ["main-captions", "MSRvid", "2012test", f"{i:04d}", score, s[2 * i], f'"{s[2 * i + 1]}']
        lines.append("\t".join(fields) + extra)
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    return path


@pytest.fixture
def stsb_sources(tmp_path) -> tuple[list[CalibrationSource], list[Path]]:
    train = _write_stsb(tmp_path / "sts-train.csv", 60, seed=1)
    dev = _write_stsb(tmp_path / "sts-dev.csv", 30, seed=2)
    sources = [
        CalibrationSource(path=Path("sts-train.csv"), format="stsb"),
        CalibrationSource(path=Path("sts-dev.csv"), format="stsb"),
    ]
    return sources, [train, dev]


def _run(tiny_bert, sources, paths, out, seq_lens=(8, 64), **kw):
    params = CalibrationDataParams(sources=sources, **{"samples": 20, **kw})
    return run(tiny_bert, paths, list(seq_lens), params, out, key="k")


def test_defaults_never_calibrate_on_test_split():
    params = CalibrationDataParams()
    assert [s.path.name for s in params.sources] == ["sts-train.csv", "sts-dev.csv"]
    assert (params.samples, params.seed, params.pack) == (300, 0, True)
    with pytest.raises(ValidationError, match="test split"):
        CalibrationSource(path=Path("../shared/data/stsb/sts-test.csv"), format="stsb")
    with pytest.raises(ValidationError, match="needs `column`"):
        CalibrationSource(path=Path("x.csv"), format="csv")


def test_stsb_sources_write_all_outputs(tiny_bert, stsb_sources, tmp_path):
    sources, paths = stsb_sources
    out = tmp_path / "out"
    payload = _run(tiny_bert, sources, paths, out)

    stamp = json.loads((out / "stage.json").read_text())
    assert stamp["key"] == "k"
    expected = {"sentences.csv", "calib_seq8.npz", "calib_seq64.npz", "token_lengths.json", "token_lengths.png"}
    assert set(stamp["files"]) == expected | {"text_pool.csv"}
    for L in (8, 64):
        arrays = load_calibration(out / calib_name(L))
        for name, arr in arrays.items():
            assert arr.shape == (20, L) and arr.dtype == np.int64, name
        assert (arrays["attention_mask"][:, 0] == 1).all()
    # 180 sentences written, quotes and the extra trailing fields of the STS-B format are handled.
    assert payload["sources"][0]["rows"] == 120 and payload["sources"][1]["rows"] == 60
    assert payload["unique_sentences"] <= 180 and payload["unique_sentences"] > 150
    sample = CALIBRATION_TEXT.validate(pd.read_csv(out / "sentences.csv", keep_default_na=False))
    assert len(sample) == payload["sentences_sampled"] and sample["sentence"].is_unique
    assert not sample["sentence"].str.contains("note").any()
    stats = json.loads((out / "token_lengths.json").read_text())
    assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert sum(stats["histogram"]["counts"]) == payload["unique_sentences"]
    # Sentences of 3-11 words: some are longer than 8 tokens, none longer than 64.
    assert 0 < stats["truncated_share"]["8"] < 1 and stats["truncated_share"]["64"] == 0
    assert (out / "token_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_pool_holds_every_unique_sentence_in_source_order(tiny_bert, stsb_sources, tmp_path):
    sources, paths = stsb_sources
    payload = _run(tiny_bert, sources, paths, tmp_path / "a", seed=0)
    _run(tiny_bert, sources, paths, tmp_path / "b", seed=1)
    pool = pd.read_csv(tmp_path / "a" / "text_pool.csv", keep_default_na=False)
    assert list(pool.columns) == ["sentence", "source"]
    assert len(pool) == payload["unique_sentences"] > payload["sentences_sampled"] and pool["sentence"].is_unique
    # Source order, then file order (first occurrence wins): the seed only changes the calibration sample.
    train = [s for s in pd.read_csv(paths[0], sep="\t", header=None, quoting=3)[5]]
    assert pool["sentence"].iloc[0] == train[0] and list(pool["source"].unique()) == ["sts-train.csv", "sts-dev.csv"]
    assert (tmp_path / "a" / "text_pool.csv").read_bytes() == (tmp_path / "b" / "text_pool.csv").read_bytes()
    sample = set(pd.read_csv(tmp_path / "a" / "sentences.csv", keep_default_na=False)["sentence"])
    assert sample <= set(pool["sentence"])


def test_packed_rows_fill_the_length_unpacked_do_not(tiny_bert, stsb_sources, tmp_path):
    sources, paths = stsb_sources
    packed = _run(tiny_bert, sources, paths, tmp_path / "p", seq_lens=(64,), pack=True)
    single = _run(tiny_bert, sources, paths, tmp_path / "s", seq_lens=(64,), pack=False)
    real = load_calibration(tmp_path / "p" / "calib_seq64.npz")["attention_mask"].sum(axis=1)
    assert real.mean() > 0.8 * 64
    assert packed["seq_lens"]["64"]["sentences_per_row_mean"] > 2
    assert single["seq_lens"]["64"]["real_tokens_mean"] < 0.6 * 64
    assert single["seq_lens"]["64"]["sentences_per_row_mean"] == 1


def test_same_seed_same_bytes_other_seed_other_rows(tiny_bert, stsb_sources, tmp_path):
    sources, paths = stsb_sources
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _run(tiny_bert, sources, paths, tmp_path / name, seq_lens=(32,), seed=seed)
    a, b, c = (tmp_path / n / "calib_seq32.npz" for n in "abc")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "sentences.csv").read_bytes() == (tmp_path / "b" / "sentences.csv").read_bytes()
    assert not np.array_equal(load_calibration(a)["input_ids"], load_calibration(c)["input_ids"])


def test_csv_tsv_jsonl_txt_sources(tiny_bert, tmp_path):
    s = _sentences(40, seed=3)
    (tmp_path / "a.csv").write_text(pd.DataFrame({"id": range(10), "text": s[:10]}).to_csv(index=False))
    (tmp_path / "b.tsv").write_text(pd.DataFrame({"text": s[10:20], "x": 1}).to_csv(sep="\t", index=False))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in s[20:30]) + "\n")
    (tmp_path / "d.txt").write_text("\n".join(s[30:40]) + "\n\n   \n")
    sources = [
        CalibrationSource(path=Path("a.csv"), format="csv", column="text"),
        CalibrationSource(path=Path("b.tsv"), format="tsv", column="text"),
        CalibrationSource(path=Path("c.jsonl"), format="jsonl", column="body"),
        CalibrationSource(path=Path("d.txt"), format="txt"),
    ]
    paths = [tmp_path / n for n in ("a.csv", "b.tsv", "c.jsonl", "d.txt")]
    payload = _run(tiny_bert, sources, paths, tmp_path / "out", seq_lens=(16,), pack=False)
    assert [src["unique"] for src in payload["sources"]] == [10, 10, 10, 10]
    assert payload["sources"][3]["blank"] == 2
    assert payload["unique_sentences"] == len(set(s))
    got = set(pd.read_csv(tmp_path / "out" / "sentences.csv")["sentence"])
    assert got <= set(s) and len(got) == 20


def _bad(tmp_path: Path, case: str) -> tuple[CalibrationSource, Path, str]:
    path = tmp_path / f"bad_{case}.csv"
    good = pd.DataFrame({"text": _sentences(30, seed=4)}).to_csv(index=False)
    if case == "missing":
        return CalibrationSource(path=path, format="csv", column="text"), path, "not found"
    if case == "empty":
        path.write_bytes(b"")
        return CalibrationSource(path=path, format="csv", column="text"), path, "empty"
    if case == "binary":
        path.write_bytes(good.encode()[:50] + b"\x00\x01\x02" + good.encode()[50:])
        return CalibrationSource(path=path, format="csv", column="text"), path, "binary"
    if case == "latin1":
        path.write_bytes("text\nLe garçon mange une crêpe à la fête.\nun autre\n".encode("latin-1"))
        return CalibrationSource(path=path, format="csv", column="text"), path, "not UTF-8"
    if case == "column":
        path.write_text(good)
        return CalibrationSource(path=path, format="csv", column="sentence"), path, "columns found: 'text'"
    if case == "duplicates":
        path.write_text("text\n" + "a man is playing a guitar.\n" * 25)
        return CalibrationSource(path=path, format="csv", column="text"), path, "same sentence"
    if case == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text('{"body": "fine"}\n{"body": broken\n')
        return CalibrationSource(path=path, format="jsonl", column="body"), path, ":2: not a JSON object"
    if case == "stsb":
        path.write_text("only\tthree\tfields\n")
        return CalibrationSource(path=path, format="stsb"), path, "expected 7"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "latin1", "column", "duplicates", "jsonl", "stsb"])
def test_bad_source_is_a_one_line_input_error_naming_the_file(tiny_bert, tmp_path, case):
    source, path, expected = _bad(tmp_path, case)
    with pytest.raises(InputError) as err:
        _run(tiny_bert, [source], [path], tmp_path / "out")
    message = str(err.value)
    assert path.name in message and expected in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_too_few_unique_sentences(tiny_bert, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n".join(_sentences(12, seed=5) * 3))
    with pytest.raises(InputError, match=r"only \d+ unique sentences for calibration_data.samples=50"):
        _run(tiny_bert, [CalibrationSource(path=Path("small.txt"), format="txt")], [path], tmp_path / "out", samples=50)
