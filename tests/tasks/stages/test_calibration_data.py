"""calibration_data: sources read and validated, deterministic sampling, packed rows fill the length."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SENTENCE_ENCODER
from helpers import sentences
from pydantic import ValidationError

from tasks.config import load_config
from tasks.core.errors import ConfigError, InputError
from tasks.core.schemas import CALIBRATION_TEXT
from tasks.data.evaluation import EvaluationParams, SentencePairsSet
from tasks.data.text import TextSource
from tasks.stages.calibration_data import CalibrationDataParams, calib_name, run

REPO = Path(__file__).resolve().parents[3]

def load_calibration(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}



def _write_stsb(path: Path, pairs: int, seed: int) -> Path:
    """STS-B distribution format: tab-separated, no header, CRLF, raw quotes, some extra fields."""
    s = sentences(2 * pairs, seed, end=".")
    lines = []
    for i in range(pairs):
        extra = "\tnote\tmore" if i % 7 == 0 else ""
        score = f"{(i % 6) * 0.8:.3f}"
        fields = ["main-captions", "MSRvid", "2012test", f"{i:04d}", score, s[2 * i], f'"{s[2 * i + 1]}']
        lines.append("\t".join(fields) + extra)
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    return path


@pytest.fixture
def stsb_sources(tmp_path) -> tuple[list[TextSource], list[Path]]:
    train = _write_stsb(tmp_path / "sts-train.csv", 60, seed=1)
    dev = _write_stsb(tmp_path / "sts-dev.csv", 30, seed=2)
    sources = [
        TextSource(path=Path("sts-train.csv"), format="stsb"),
        TextSource(path=Path("sts-dev.csv"), format="stsb"),
    ]
    return sources, [train, dev]


def evaluated(folder: Path, texts: list[str]) -> EvaluationParams:
    """An evaluation set (sentence pairs) made of `texts`."""
    half = len(texts) // 2
    path = folder / "eval_pairs.csv"
    pd.DataFrame({"sentence1": texts[:half], "sentence2": texts[half : 2 * half], "score": range(half)}).to_csv(
        path, index=False)
    return EvaluationParams(sets=[SentencePairsSet(name="pairs", path=path)])


def _run(tiny_bert, sources, paths, out, seq_lens=(8, 64), evaluation=None, **kw):
    params = CalibrationDataParams(sources=sources, **{"samples": 20, **kw})
    evaluation = evaluation or evaluated(out.parent, sentences(20, seed=99, end="?"))
    return run(tiny_bert, paths, list(seq_lens), params, SENTENCE_ENCODER, evaluation, out, key="k")


def test_defaults_and_the_project_never_calibrates_on_an_evaluation_set():
    # Sources have no default any more: params.yaml names them (STS-B train + dev, never the test split).
    with pytest.raises(ValidationError, match="sources"):
        CalibrationDataParams()
    with pytest.raises(ValidationError, match="give either sources \(text\) or images"):
        CalibrationDataParams(sources=[])
    params = load_config(REPO / "params.yaml").calibration_data
    assert [(s.path.as_posix(), s.format) for s in params.sources] == [("data/wikipedia/summaries_en-us.json", "json")]
    assert (params.samples, params.seed, params.pack) == (300, 0, True)
    defaults = CalibrationDataParams(sources=params.sources)
    assert (defaults.samples, defaults.seed, defaults.pack) == (300, 0, True)
    # The test split is evaluation set `stsb`: config validation refuses it as calibration text.
    test_split = {"path": "../shared/data/stsb/sts-test.csv", "format": "stsb"}
    with pytest.raises(ConfigError, match="is evaluation set 'stsb'; never calibrate"):
        load_config(REPO / "params.yaml", {"calibration_data": {"sources": [test_split]}})
    with pytest.raises(ValidationError, match="needs `column`"):
        TextSource(path=Path("x.csv"), format="csv")


def test_stsb_sources_write_all_outputs(tiny_bert, stsb_sources, tmp_path):
    sources, paths = stsb_sources
    out = tmp_path / "out"
    payload = _run(tiny_bert, sources, paths, out)

    stamp = json.loads((out / "stage.json").read_text())
    assert stamp["key"] == "k"
    expected = {"sentences.csv", "calib_seq8.npz", "calib_seq64.npz", "calib_rows_seq8.npz", "calib_rows_seq64.npz",
                "token_lengths.json", "token_lengths.png"}
    assert set(stamp["files"]) == expected | {"text_pool.csv"}
    sampled = pd.read_csv(out / "sentences.csv", keep_default_na=False)
    for L in (8, 64):
        arrays = load_calibration(out / calib_name(L))
        for name, arr in arrays.items():
            assert arr.shape == (20, L) and arr.dtype == np.int64, name
        assert (arrays["attention_mask"][:, 0] == 1).all()
        # One sampled sentence per row for dynamic-shape variants: its own token count, capped at L.
        single = load_calibration(out / calib_name(L, rows_of_one=True))
        assert single["input_ids"].shape == (20, L)
        np.testing.assert_array_equal(single["row_lengths"], np.minimum(sampled["n_tokens"][:20], L))
        np.testing.assert_array_equal(single["attention_mask"].sum(axis=1), single["row_lengths"])
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
    s = sentences(40, seed=3, end=".")
    (tmp_path / "a.csv").write_text(pd.DataFrame({"id": range(10), "text": s[:10]}).to_csv(index=False))
    (tmp_path / "b.tsv").write_text(pd.DataFrame({"text": s[10:20], "x": 1}).to_csv(sep="\t", index=False))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in s[20:30]) + "\n")
    (tmp_path / "d.txt").write_text("\n".join(s[30:40]) + "\n\n   \n")
    sources = [
        TextSource(path=Path("a.csv"), format="csv", column="text"),
        TextSource(path=Path("b.tsv"), format="tsv", column="text"),
        TextSource(path=Path("c.jsonl"), format="jsonl", column="body"),
        TextSource(path=Path("d.txt"), format="txt"),
    ]
    paths = [tmp_path / n for n in ("a.csv", "b.tsv", "c.jsonl", "d.txt")]
    payload = _run(tiny_bert, sources, paths, tmp_path / "out", seq_lens=(16,), pack=False)
    assert [src["unique"] for src in payload["sources"]] == [10, 10, 10, 10]
    assert payload["sources"][3]["blank"] == 2
    assert payload["unique_sentences"] == len(set(s))
    got = set(pd.read_csv(tmp_path / "out" / "sentences.csv")["sentence"])
    assert got <= set(s) and len(got) == 20


def _bad(tmp_path: Path, case: str) -> tuple[TextSource, Path, str]:
    path = tmp_path / f"bad_{case}.csv"
    good = pd.DataFrame({"text": sentences(30, seed=4, end=".")}).to_csv(index=False)
    if case == "missing":
        return TextSource(path=path, format="csv", column="text"), path, "not found"
    if case == "empty":
        path.write_bytes(b"")
        return TextSource(path=path, format="csv", column="text"), path, "empty"
    if case == "binary":
        path.write_bytes(good.encode()[:50] + b"\x00\x01\x02" + good.encode()[50:])
        return TextSource(path=path, format="csv", column="text"), path, "binary"
    if case == "latin1":
        path.write_bytes("text\nLe garçon mange une crêpe à la fête.\nun autre\n".encode("latin-1"))
        return TextSource(path=path, format="csv", column="text"), path, "not UTF-8"
    if case == "column":
        path.write_text(good)
        return TextSource(path=path, format="csv", column="sentence"), path, "columns found: 'text'"
    if case == "duplicates":
        path.write_text("text\n" + "a man is playing a guitar.\n" * 25)
        return TextSource(path=path, format="csv", column="text"), path, "same sentence"
    if case == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text('{"body": "fine"}\n{"body": broken\n')
        return TextSource(path=path, format="jsonl", column="body"), path, ":2: not a JSON object"
    if case == "stsb":
        path.write_text("only\tthree\tfields\n")
        return TextSource(path=path, format="stsb"), path, "expected 7"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "latin1", "column", "duplicates", "jsonl", "stsb"])
def test_bad_source_is_a_one_line_input_error_naming_the_file(tiny_bert, tmp_path, case):
    source, path, expected = _bad(tmp_path, case)
    with pytest.raises(InputError) as err:
        _run(tiny_bert, [source], [path], tmp_path / "out")
    message = str(err.value)
    assert path.name in message and expected in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_json_records_split_into_sentences_with_provenance(tiny_bert, tmp_path):
    paragraphs = {f"t{i}": {"extract": " ".join(s.capitalize() for s in sentences(3, seed=i, end=".")), "n": i}
                  for i in range(30)}
    paragraphs["t30"] = {"n": 30}  # a record without the key is skipped
    (tmp_path / "s.json").write_text(json.dumps(paragraphs))
    source = TextSource(path=Path("s.json"), format="json", column="extract", split_sentences=True,
                        provenance="made up for the test, CC0")
    payload = _run(tiny_bert, [source], [tmp_path / "s.json"], tmp_path / "out", seq_lens=(16,))
    pool = pd.read_csv(tmp_path / "out" / "text_pool.csv")
    wanted = [s.capitalize() for i in range(30) for s in sentences(3, seed=i, end=".")]
    assert pool["sentence"].tolist() == list(dict.fromkeys(wanted))  # one row per sentence, file order
    (info,) = payload["sources"]
    assert info["provenance"] == "made up for the test, CC0" and info["split_sentences"] is True
    assert info["sha256"] == hashlib.sha256((tmp_path / "s.json").read_bytes()).hexdigest()
    with pytest.raises(InputError, match="no record has key 'text'"):
        _run(tiny_bert, [source.model_copy(update={"column": "text"})], [tmp_path / "s.json"], tmp_path / "o2")


def test_calibration_refuses_rows_that_are_evaluated(tiny_bert, tmp_path):
    pool = sentences(60, seed=3, end=".")
    (tmp_path / "pool.txt").write_text("\n".join(pool))
    evaluation = evaluated(tmp_path, [*sentences(18, seed=4, end="?"), pool[5], pool[9]])
    with pytest.raises(InputError) as err:
        _run(tiny_bert, [TextSource(path=Path("pool.txt"), format="txt")], [tmp_path / "pool.txt"],
             tmp_path / "out", evaluation=evaluation)
    message = str(err.value)
    assert message.startswith("pool.txt: 2 rows of the calibration and distillation text are texts of evaluation "
                              "set 'pairs'") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_too_few_unique_sentences(tiny_bert, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n".join(sentences(12, seed=5, end=".") * 3))
    with pytest.raises(InputError, match=r"only \d+ unique sentences for calibration_data.samples=50"):
        _run(tiny_bert, [TextSource(path=Path("small.txt"), format="txt")], [path], tmp_path / "out", samples=50)
