"""Evaluation sets a user brings: their formats, their metrics, and one clear line for a bad file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, STSB_TEST

from tasks.config import load_config
from tasks.core.errors import InputError
from tasks.data.evaluation import (
    LabelledTextSet,
    RetrievalSet,
    SentencePairsSet,
    check_columns,
    load,
    macro_f1,
    ranking_metric,
    texts,
)


def _csv(path, **columns):
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


def test_pairs_csv_scores_spearman_of_cosines_and_prefixes_line_up(tmp_path):
    path = _csv(tmp_path / "pairs.csv", left=["a b", "c d", "a b", "e f"], right=["a c", "e f", "c d", "g h"],
                gold=[3.0, 2.0, 1.0, 0.0])
    pairs = SentencePairsSet(name="mine", path=path, sentence1="left", sentence2="right", score="gold")
    data = load(pairs)
    assert data.items == 4 and data.inputs == ["a b", "a c", "c d", "e f", "g h"] and data.metric_name == "spearman"
    # Outputs whose pair cosines rank exactly as the gold scores: Spearman 100; reversed: -100.
    outputs = {"a b": [1, 0], "a c": [1, 0.1], "c d": [1, 1.5], "e f": [0, 1], "g h": [-1, 0.2]}
    matrix = np.array([outputs[t] for t in data.inputs], dtype=np.float32)
    assert data.score(matrix) == pytest.approx(100.0)
    # The first n items' texts are a prefix of all texts (what the reference and the simulator subset rely on).
    first = data.subset(2)
    assert first.items == 2 and data.inputs[: len(first.inputs)] == first.inputs


def test_stsb_reader_reads_the_files_as_distributed():
    data = load(SentencePairsSet(name="stsb", path=STSB_TEST, reader="stsb"), limit=50)
    assert data.items == 50 and len(data.inputs) <= 100


def test_labelled_text_scores_accuracy_and_macro_f1_with_class_names(tmp_path):
    path = _csv(tmp_path / "texts.csv", text=["good", "bad", "fine", "awful"], label=["pos", "neg", "pos", "neg"])
    logits = np.array([[0.1, 2.0], [3.0, 0.0], [1.0, 0.0], [0.0, 5.0]])  # right, right, wrong, wrong
    accuracy = load(LabelledTextSet(name="reviews", path=path), class_names=["neg", "pos"])
    assert accuracy.score(logits) == pytest.approx(50.0)
    f1 = load(LabelledTextSet(name="reviews", path=path, metric="macro_f1"), class_names=["neg", "pos"])
    assert f1.score(logits) == pytest.approx(50.0) and f1.metric_name == "macro_f1"
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 1, 1])) == pytest.approx((2 / 3 + 2 / 3) / 2)
    # Labels may also be class indices.
    indexed = _csv(tmp_path / "indexed.csv", text=["good", "bad"], label=["1", "0"])
    assert load(LabelledTextSet(name="x", path=indexed), class_names=["neg", "pos"]).score(logits[:2]) == 100.0


def test_a_label_the_model_does_not_know_is_one_line(tmp_path):
    path = _csv(tmp_path / "texts.csv", text=["good", "bad"], label=["pos", "meh"])
    with pytest.raises(InputError, match=r"texts.csv: label 'meh' is neither a class name of the model \(neg, pos\)"):
        load(LabelledTextSet(name="reviews", path=path), class_names=["neg", "pos"])


def test_retrieval_scores_ndcg_and_recall_at_10(tmp_path):
    queries = _csv(tmp_path / "q.csv", id=["q1", "q2"], text=["cats", "dogs"])
    corpus = _csv(tmp_path / "c.csv", id=["d1", "d2", "d3"], text=["a cat", "a dog", "a car"])
    qrels = _csv(tmp_path / "qrels.csv", query_id=["q1", "q2"], doc_id=["d1", "d2"], relevance=[1, 1])
    data = load(RetrievalSet(name="pets", queries=queries, corpus=corpus, qrels=qrels))
    assert data.items == 2 and data.inputs == ["a cat", "a dog", "a car", "cats", "dogs"]
    docs = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    right = np.vstack([docs, [[1, 0.1, 0], [0.1, 1, 0]]])
    wrong = np.vstack([docs, [[0, 0, 1], [0, 0.1, 1]]])
    assert data.score(right) == pytest.approx(100.0)
    assert data.score(wrong) < data.score(right)
    assert ranking_metric(np.array([[0.9, 0.1]]), [{1: 1.0}], "recall@10") == 100.0  # both docs are in the top 10


def test_qrels_naming_a_missing_document_is_one_line(tmp_path):
    queries = _csv(tmp_path / "q.csv", id=["q1"], text=["cats"])
    corpus = _csv(tmp_path / "c.csv", id=["d1"], text=["a cat"])
    qrels = _csv(tmp_path / "qrels.csv", query_id=["q1"], doc_id=["d9"], relevance=[1])
    with pytest.raises(InputError, match="qrels.csv: doc_id 'd9' is not in"):
        load(RetrievalSet(name="pets", queries=queries, corpus=corpus, qrels=qrels))


@pytest.mark.parametrize(
    ("eval_set", "message"),
    [
        (lambda p: SentencePairsSet(name="m", path=p), r"has no column\(s\) \['sentence1', 'sentence2', 'score'\]"),
        (lambda p: LabelledTextSet(name="m", path=p, text="review"), r"has no column\(s\) \['review', 'label'\]"),
    ],
)
def test_a_missing_column_is_one_line_before_any_stage(tmp_path, eval_set, message):
    path = _csv(tmp_path / "data.csv", a=["x"], b=["y"])
    with pytest.raises(InputError, match=message) as err:
        check_columns(eval_set(path))
    assert "evaluation.sets" in str(err.value) and "\n" not in str(err.value)


def _lee_folder(folder, docs: list[str], matrix: list[list[float]]):
    folder.mkdir()
    (folder / "lee.cor").write_bytes("\n".join(docs).encode("latin-1") + b"\n")
    (folder / "similarities0-1.txt").write_text("\n".join("\t".join(str(v) for v in row) for row in matrix) + "\n")
    return folder


def test_lee50_reader_pairs_the_upper_triangle_and_says_what_is_wrong(tmp_path):
    docs = ["Prices rose by £3 in Sydney.", "Rain fell in Perth.", "The Reserve Bank held rates."]
    folder = _lee_folder(tmp_path / "lee", docs, [[1, 0.3, 0.8], [0, 1, 0.2], [0, 0, 1]])
    data = load(SentencePairsSet(name="lee", path=folder, reader="lee50"))
    assert data.items == 3 and data.inputs == docs  # Latin-1 decoded: the pound sign survives
    # Pairs (0,1) 0.3, (0,2) 0.8, (1,2) 0.2: outputs whose cosines rank the same way score Spearman 100.
    outputs = np.array([[1, 0], [0.6, 0.8], [0.95, -0.31]], dtype=np.float32)
    assert data.score(outputs) == pytest.approx(100.0)
    check_columns(SentencePairsSet(name="lee", path=folder, reader="lee50"))

    bad = _lee_folder(tmp_path / "bad", docs, [[1, 0.3], [0, 1]])
    with pytest.raises(InputError, match=r"a 2 x 2 matrix for 3 documents"):
        check_columns(SentencePairsSet(name="lee", path=bad, reader="lee50"))
    (folder / "lee.cor").unlink()
    with pytest.raises(InputError, match="infra/data/fetch.sh") as err:
        load(SentencePairsSet(name="lee", path=folder, reader="lee50"))
    assert "\n" not in str(err.value)


def test_the_default_second_set_is_lee50_from_another_source_than_stsb():
    sets = load_config(REPO / "params.yaml").evaluation.sets
    assert [(s.name, s.reader) for s in sets] == [("stsb", "stsb"), ("lee50", "lee50")]
    lee = load(sets[1])
    assert (lee.items, len(lee.inputs)) == (1225, 50)  # every pair of the 50 documents
    stsb = texts(sets[0])
    assert not any(sentence in document for document in lee.inputs for sentence in stsb if len(sentence) >= 30)
