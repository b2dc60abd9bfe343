"""Evaluation sets a user configures, and the metric each one reports.

Formats (`evaluation.sets[].format` in params.yaml):
  sentence_pairs  two texts and a gold score per row -> Spearman x100 of the cosine of the two outputs
                  against the gold scores (readers `stsb` and `lee50` read those sets as distributed)
  labelled_text   a text and its label per row -> accuracy x100 or macro F1 x100 of the argmax of the
                  outputs (the model's class names map labels to output indices)
  retrieval       queries, a corpus and relevance judgements -> nDCG@10 or recall@10 x100 of the corpus
                  ranked by cosine to each query
  labelled_images a CSV of image paths and labels -> top-1 or top-5 accuracy % of the outputs (labels as for
                  labelled_text)
  image_folder    one sub-folder of images per class, named by the class name or index -> top-1 or top-5 accuracy %
  images          images without labels (a folder, or a CSV of paths) -> top-1 agreement % with the fp32
                  model's outputs (the reference stage's), never called accuracy
Every metric is higher-is-better, scaled to 0-100. Image inputs are paths (relative to the project root or
absolute) that the family reads. `load` turns a set into `EvalData`: the unique texts
the model must run (in an order where the texts of the first N items are a prefix of all the texts, so a
reference computed on a prefix lines up with any run row by row) and a scorer from outputs to the metric.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
import pandas as pd
import pandera.errors
from pydantic import Field, model_validator

from tasks.core.errors import InputError, StageError
from tasks.core.onnx_graph import row_cosines
from tasks.core.params import StrictParams
from tasks.core.schemas import LABELLED_TEXT, RETRIEVAL_QRELS, SENTENCE_PAIRS, describe
from tasks.data import images as image_files
from tasks.data import lee50, stsb
from tasks.data.text import read_table, read_text_file

Reader = Literal["csv", "tsv", "jsonl"]
TOP_K = 10
PAIR_READERS = {"stsb": stsb.read_pairs, "lee50": lee50.read_pairs}
"""Sentence-pair sets read as distributed (`reader:`), each to a validated score, sentence1, sentence2 frame."""


class _EvalSetBase(StrictParams):
    name: str = Field(pattern=r"^[a-z0-9_\-]+$", description="label in tables and MLflow (lower-case, digits, _ -)")
    max_items: int | None = Field(None, ge=2, description="first N items (pairs, texts, queries, images); null = all")
    needs_reference: ClassVar[bool] = False
    """Scored against the fp32 model's outputs (the reference stage runs every input of such a set)."""


class SentencePairsSet(_EvalSetBase):
    format: Literal["sentence_pairs"] = "sentence_pairs"
    path: Path
    reader: Literal["stsb", "lee50", "csv", "tsv", "jsonl"] = Field(
        "csv",
        description="stsb: an STS Benchmark file as distributed (tab-separated, no header); lee50: the folder "
        "holding the Lee50 documents and similarity matrix (tasks/data/lee50.py)",
    )
    sentence1: str = "sentence1"
    sentence2: str = "sentence2"
    score: str = "score"
    metric: Literal["spearman"] = "spearman"

    def files(self) -> dict[str, Path]:
        return {"path": self.path}

    def columns(self) -> list[str]:
        return [] if self.reader in PAIR_READERS else [self.sentence1, self.sentence2, self.score]


class LabelledTextSet(_EvalSetBase):
    format: Literal["labelled_text"] = "labelled_text"
    path: Path
    reader: Reader = "csv"
    text: str = Field("text", description="column holding the text")
    label: str = Field("label", description="column holding the label: a class name of the model or its index")
    metric: Literal["accuracy", "macro_f1"] = "accuracy"

    def files(self) -> dict[str, Path]:
        return {"path": self.path}

    def columns(self) -> list[str]:
        return [self.text, self.label]


class RetrievalSet(_EvalSetBase):
    format: Literal["retrieval"] = "retrieval"
    queries: Path = Field(description="columns id, text")
    corpus: Path = Field(description="columns id, text")
    qrels: Path = Field(description="columns query_id, doc_id, relevance (> 0 = relevant)")
    reader: Reader = "csv"
    metric: Literal["ndcg@10", "recall@10"] = "ndcg@10"

    def files(self) -> dict[str, Path]:
        return {"queries": self.queries, "corpus": self.corpus, "qrels": self.qrels}

    def columns(self) -> list[str]:
        return ["id", "text"]

    @model_validator(mode="after")
    def _distinct(self) -> RetrievalSet:
        if len({self.queries, self.corpus, self.qrels}) != 3:
            raise ValueError("queries, corpus and qrels must be three different files")
        return self


class LabelledImagesSet(_EvalSetBase):
    format: Literal["labelled_images"] = "labelled_images"
    path: Path = Field(description="CSV of image paths (relative to the project root) and labels")
    image: str = Field("path", description="column holding the image path")
    label: str = Field("label", description="column holding the label: a class name of the model or its index")
    metric: Literal["top1", "top5"] = "top1"
    package: str | None = Field(None, description="the installed distribution the image paths are relative to")
    reader: ClassVar[str] = "csv"

    def files(self) -> dict[str, Path]:
        return {"path": self.path}

    def columns(self) -> list[str]:
        return [self.image, self.label]


class ImageFolderSet(_EvalSetBase):
    format: Literal["image_folder"] = "image_folder"
    path: Path = Field(description="folder with one sub-folder of images per class (named by class name or index)")
    metric: Literal["top1", "top5"] = "top1"
    reader: ClassVar[str] = "folder"

    def files(self) -> dict[str, Path]:
        return {"path": self.path}

    def columns(self) -> list[str]:
        return []


class ImagesSet(_EvalSetBase):
    format: Literal["images"] = "images"
    path: Path = Field(description="folder of images, or CSV of image paths (relative to the project root)")
    reader: Literal["folder", "csv"] = "folder"
    image: str = Field("path", description="csv: column holding the image path")
    metric: Literal["top1_agreement"] = "top1_agreement"
    package: str | None = Field(None, description="csv: the installed distribution the image paths are relative to")
    needs_reference: ClassVar[bool] = True

    def files(self) -> dict[str, Path]:
        return {"path": self.path}

    def columns(self) -> list[str]:
        return [self.image] if self.reader == "csv" else []

    def source(self) -> image_files.ImageSource:
        return image_files.ImageSource(path=self.path, format=self.reader, column=self.image, package=self.package)

    @model_validator(mode="after")
    def _package_csv(self) -> ImagesSet:
        if self.package and self.reader != "csv":
            raise ValueError(f"{self.name}: package {self.package!r} needs reader: csv (a CSV of paths inside it)")
        return self


IMAGE_SETS = (LabelledImagesSet, ImageFolderSet, ImagesSet)
EvalSet = Annotated[SentencePairsSet | LabelledTextSet | RetrievalSet | LabelledImagesSet | ImageFolderSet | ImagesSet,
                    Field(discriminator="format")]


class EvaluationParams(StrictParams):
    """How every artifact is scored: the first set is the headline metric, all of them bound the budget."""

    sets: list[EvalSet] = Field(min_length=1)

    def names(self) -> list[str]:
        return [s.name for s in self.sets]


@dataclass(frozen=True)
class EvalData:
    """One evaluation set ready to run: the inputs (texts, image paths), and how outputs for them become the metric."""

    name: str
    metric_name: str
    inputs: list[str]
    items: int
    score: Callable[..., float]
    """score(outputs) -> metric; a set that `needs_reference` takes score(outputs, reference), where reference is
    the fp32 model's outputs on the same inputs."""
    subset: Callable[[int], EvalData]
    """The same set cut to its first n items (for slow engines such as a simulator)."""
    total_items: int
    """Items in the whole file: more than `items` when the set was cut (max_items, quick mode)."""
    higher_is_better: bool = True
    needs_reference: bool = False


# --------------------------------------------------------------------------- checks before a run


REFERENCE_SETS = "reference_sets.json"
"""Beside the reference outputs: which rows belong to which evaluation set ({"sets": [[name, rows], ...]})."""


def reference_plan(sets: list[EvalData], samples: int) -> list[tuple[str, list[str]]]:
    """What the reference runs: the first `samples` inputs of the first set (the cosine columns), and every input
    of each set scored against the fp32 outputs (`needs_reference`, the first set included)."""
    return [(d.name, d.inputs if d.needs_reference else d.inputs[:samples]) for i, d in enumerate(sets)
            if i == 0 or d.needs_reference]


def write_reference_sets(folder: Path, plan: list[tuple[str, list[str]]]) -> None:
    (Path(folder) / REFERENCE_SETS).write_text(json.dumps({"sets": [[n, len(i)] for n, i in plan]}) + "\n",
                                               encoding="utf-8")


class Scorer:
    """Every evaluation set's inputs as one feed block, and each set's metric from the block's outputs."""

    def __init__(self, sets: list[EvalData], reference: np.ndarray, reference_path: Path,
                 eval_sets: list[EvalSet]):
        self.sets, self.reference, self.reference_path = sets, reference, Path(reference_path)
        self.stsb = [s.reader == "stsb" and s.metric == "spearman" for s in eval_sets]
        self.inputs = [text for data in sets for text in data.inputs]
        self.offsets = np.cumsum([0, *(len(d.inputs) for d in sets)])
        blocks_file = self.reference_path.with_name(REFERENCE_SETS)
        # Without the file (a reference of the first set only): all rows are the first set's.
        blocks = json.loads(blocks_file.read_text(encoding="utf-8"))["sets"] if blocks_file.is_file() \
            else [[sets[0].name, len(reference)]]
        starts = np.cumsum([0, *(rows for _, rows in blocks)])
        self.blocks = {name: (int(a), int(rows)) for (name, rows), a in zip(blocks, starts)}

    def reference_of(self, data: EvalData) -> np.ndarray | None:
        """The fp32 outputs of a set's inputs (a prefix of the set's reference rows); None when it needs none."""
        if not data.needs_reference:
            return None
        start, rows = self.blocks.get(data.name, (0, 0))
        if len(data.inputs) > rows:
            raise InputError(
                f"evaluation set {data.name!r}: {len(data.inputs)} inputs, but the fp32 reference ({self.reference_path}) "
                f"holds {rows} of them; rerun the reference stage (or lower the set's max_items)"
            )
        return self.reference[start : start + len(data.inputs)]

    def score(self, data: EvalData, outputs: np.ndarray) -> float:
        """A set's metric from its outputs (rows in the set's input order), against the reference when it needs one."""
        return data.score(outputs, self.reference_of(data)) if data.needs_reference else data.score(outputs)

    def evaluations(self, outputs: np.ndarray, source: str) -> list[dict]:
        return [
            {"eval_set": data.name, "metric_name": data.metric_name, "metric_value": self.score(data, outputs[a:b]),
             "higher_is_better": data.higher_is_better, "items": data.items, "total_items": data.total_items,
             "accuracy_source": source}
            for data, a, b in zip(self.sets, self.offsets[:-1], self.offsets[1:])
        ]

    def columns(self, outputs: np.ndarray, evaluations: list[dict]) -> dict:
        """The row's accuracy columns: the first set's metric and the cosine to the fp32 reference."""
        first = evaluations[0]
        # Both are prefixes of the first set's inputs.
        n = min(self.blocks[self.sets[0].name][1], self.offsets[1], len(outputs))
        if self.reference.shape[1:] != outputs.shape[1:]:
            raise InputError(
                f"{self.reference_path}: output shape {self.reference.shape[1:]} differs from this model's "
                f"{outputs.shape[1:]}"
            )
        cos = row_cosines(outputs[:n].reshape(n, -1), self.reference[:n].reshape(n, -1))
        return {"eval_set": first["eval_set"], "metric_name": first["metric_name"],
                "metric_value": first["metric_value"], "higher_is_better": first["higher_is_better"],
                "eval_items": first["items"], "eval_total_items": first["total_items"], "stsb_spearman": first["metric_value"] if self.stsb[0] else None,
                "cosine_to_fp32_mean": float(cos.mean()), "cosine_to_fp32_min": float(cos.min())}


def check_columns(eval_set: EvalSet) -> None:
    """Read only the header (or first line) of each file: a missing column is one line before any stage."""
    for field_name, path in eval_set.files().items():
        where = f"evaluation set {eval_set.name!r} ({field_name})"
        if eval_set.reader == "folder":
            if not Path(path).is_dir():
                raise InputError(f"{path}: {where} is not a folder; fix its path under evaluation.sets in params.yaml")
            continue
        if eval_set.reader in PAIR_READERS:
            PAIR_READERS[eval_set.reader](Path(path))  # small files, read whole: every error before any stage
            continue
        text = read_text_file(Path(path), where)
        needed = eval_set.columns()
        if isinstance(eval_set, RetrievalSet) and field_name == "qrels":
            needed = list(RETRIEVAL_QRELS.columns)
        first = text.splitlines()[0] if text.splitlines() else ""
        if eval_set.reader == "jsonl":
            read_table(Path(path), "jsonl", needed, where)  # small files; parses every line
            continue
        header = next(csv.reader([first], delimiter="," if eval_set.reader == "csv" else "\t"))
        missing = [c for c in needed if c not in header]
        if missing:
            raise InputError(
                f"{path}: {where} has no column(s) {missing} (columns found: {header}); "
                "fix the column names under evaluation.sets in params.yaml"
            )


# --------------------------------------------------------------------------- loading


def _validated(frame: pd.DataFrame, schema, path: Path) -> pd.DataFrame:
    try:
        return schema.validate(frame, lazy=False)
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        raise InputError(f"{path}: {describe(exc)}") from exc


def _first(frame: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    return frame.head(limit) if limit else frame


def _shuffled(frame: pd.DataFrame, seed: int | None) -> pd.DataFrame:
    return frame if seed is None else frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def load(eval_set: EvalSet, class_names: list[str] | None = None, limit: int | None = None,
         seed: int | None = None) -> EvalData:
    """The set read and validated, cut to `max_items` and then to `limit` items (quick mode); with `seed`, the
    items are shuffled by it first, so the cut is a seeded random subset rather than the file's first items."""
    caps = [n for n in (eval_set.max_items, limit) if n]
    cap = min(caps) if caps else None
    if isinstance(eval_set, SentencePairsSet):
        return _pairs(eval_set, cap, seed)
    if isinstance(eval_set, LabelledTextSet):
        return _labelled(eval_set, class_names, cap, seed)
    if isinstance(eval_set, (LabelledImagesSet, ImageFolderSet)):
        return _labelled_images(eval_set, class_names, cap, seed)
    if isinstance(eval_set, ImagesSet):
        return _agreement(eval_set, cap, seed)
    return _retrieval(eval_set, cap, seed)


def unique_pair_texts(pairs: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Unique sentences in pair order (s1, s2, s1, s2, ...) and each pair's two indices into them.

    Pair order makes the unique sentences of the first N pairs a prefix of those of all pairs.
    """
    sentences = list(dict.fromkeys(s for pair in zip(pairs["sentence1"], pairs["sentence2"]) for s in pair))
    index = {s: i for i, s in enumerate(sentences)}
    return sentences, pairs["sentence1"].map(index).to_numpy(), pairs["sentence2"].map(index).to_numpy()


def spearman_x100(outputs: np.ndarray, left: np.ndarray, right: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(row_cosines(outputs[left], outputs[right]), gold).statistic * 100)


def _pair_frame(s: SentencePairsSet) -> pd.DataFrame:
    if s.reader in PAIR_READERS:
        return PAIR_READERS[s.reader](s.path)
    raw = read_table(s.path, s.reader, [s.sentence1, s.sentence2, s.score], f"evaluation set {s.name!r}")
    raw = raw.rename(columns={s.sentence1: "sentence1", s.sentence2: "sentence2", s.score: "score"})
    raw = raw.assign(sentence1=raw["sentence1"].str.strip(), sentence2=raw["sentence2"].str.strip())
    return _validated(raw[["score", "sentence1", "sentence2"]], SENTENCE_PAIRS, s.path)


def _pairs(s: SentencePairsSet, cap: int | None, seed: int | None = None) -> EvalData:
    full = _shuffled(_pair_frame(s), seed)

    def build(n: int | None) -> EvalData:
        cut = _first(full, n)
        texts, left, right = unique_pair_texts(cut)
        gold = cut["score"].to_numpy()
        return EvalData(s.name, s.metric, texts, len(cut), lambda out: spearman_x100(out, left, right, gold),
                        subset=lambda k: build(min(k, len(cut))), total_items=len(full))

    return build(cap)


def class_index(labels: pd.Series, class_names: list[str] | None, path: Path) -> np.ndarray:
    """Labels as output indices: a class name of the model, or the index itself."""
    names = {str(name): i for i, name in enumerate(class_names or [])}
    out = []
    for label in labels:
        if label in names:
            out.append(names[label])
        elif label.isdigit() and (not class_names or int(label) < len(class_names)):
            out.append(int(label))
        else:
            known = ", ".join(list(names)[:8]) or "none"
            raise InputError(
                f"{path}: label {label!r} is neither a class name of the model ({known}) nor a class index; "
                "fix the label column"
            )
    return np.asarray(out)


def macro_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    scores = []
    for c in np.unique(np.concatenate([predicted, truth])):
        tp = np.sum((predicted == c) & (truth == c))
        denom = np.sum(predicted == c) + np.sum(truth == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def _labelled(s: LabelledTextSet, class_names: list[str] | None, cap: int | None, seed: int | None = None) -> EvalData:
    raw = read_table(s.path, s.reader, [s.text, s.label], f"evaluation set {s.name!r}")
    frame = raw.rename(columns={s.text: "text", s.label: "label"})
    frame = _validated(frame.assign(text=frame["text"].str.strip(), label=frame["label"].str.strip()), LABELLED_TEXT,
                       s.path)
    frame = _shuffled(frame, seed)
    truth_all = class_index(frame["label"], class_names, s.path)

    def build(n: int | None) -> EvalData:
        cut = _first(frame, n)
        truth = truth_all[: len(cut)]

        def score(outputs: np.ndarray) -> float:
            predicted = np.asarray(outputs).reshape(len(outputs), -1).argmax(axis=1)
            if s.metric == "accuracy":
                return float(np.mean(predicted == truth) * 100)
            return macro_f1(predicted, truth) * 100

        return EvalData(s.name, s.metric, cut["text"].tolist(), len(cut), score, subset=lambda k: build(min(k, len(cut))),
                        total_items=len(frame))

    return build(cap)


def top_k_accuracy(outputs: np.ndarray, truth: np.ndarray, k: int) -> float:
    """% of rows whose true class is among the k highest outputs."""
    top = np.argsort(-np.asarray(outputs).reshape(len(outputs), -1), axis=1, kind="stable")[:, :k]
    return float(np.mean((top == np.asarray(truth)[:, None]).any(axis=1)) * 100)


def image_labels(s: LabelledImagesSet | ImageFolderSet) -> pd.DataFrame:
    """Columns path (as the family reads it) and label of a labelled image set, in file (or folder) order."""
    if isinstance(s, LabelledImagesSet):
        raw = read_table(s.path, "csv", [s.image, s.label], f"evaluation set {s.name!r}")
        frame = pd.DataFrame({"path": raw[s.image].str.strip(), "label": raw[s.label].str.strip()})
        blank = frame[(frame["path"] == "") | (frame["label"] == "")]
        if not blank.empty:
            raise InputError(f"{s.path}: row {blank.index[0] + 2} has no image path or label; fill or remove it")
        if s.package:
            base = image_files.package_root(s.package)
            frame["path"] = [str(image_files.resolve(p, base)) for p in frame["path"]]
        return frame
    root = image_files.resolve(s.path)
    classes = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    rows = [(str(image), c.name) for c in classes for image in image_files.list_folder(c)]
    if not rows:
        raise InputError(f"{s.path}: no class sub-folders with images (ImageFolder layout: <class>/<image>); fix "
                         f"evaluation set {s.name!r}")
    return pd.DataFrame(rows, columns=["path", "label"])


def _labelled_images(s: LabelledImagesSet | ImageFolderSet, class_names: list[str] | None, cap: int | None,
                     seed: int | None = None) -> EvalData:
    frame = _shuffled(image_labels(s), seed)
    truth_all = class_index(frame["label"], class_names, s.path)
    k = 5 if s.metric == "top5" else 1

    def build(n: int | None) -> EvalData:
        cut = _first(frame, n)
        truth = truth_all[: len(cut)]
        return EvalData(s.name, s.metric, cut["path"].tolist(), len(cut), lambda out: top_k_accuracy(out, truth, k),
                        subset=lambda m: build(min(m, len(cut))), total_items=len(frame))

    return build(cap)


def top1_agreement(outputs: np.ndarray, reference: np.ndarray | None) -> float:
    """% of rows whose highest output is the fp32 model's highest output."""
    if reference is None or len(reference) != len(outputs):
        raise StageError(f"top-1 agreement needs the fp32 outputs of the same {len(outputs)} inputs")
    flat = np.asarray(outputs).reshape(len(outputs), -1)
    return float(np.mean(flat.argmax(axis=1) == np.asarray(reference).reshape(len(reference), -1).argmax(axis=1)) * 100)


def _agreement(s: ImagesSet, cap: int | None, seed: int | None = None) -> EvalData:
    paths = [str(p) for p in image_files.list_images(s.source())]
    frame = _shuffled(pd.DataFrame({"path": paths}), seed)

    def build(n: int | None) -> EvalData:
        cut = _first(frame, n)
        return EvalData(s.name, s.metric, cut["path"].tolist(), len(cut), top1_agreement,
                        subset=lambda m: build(min(m, len(cut))), total_items=len(frame), needs_reference=True)

    return build(cap)


def listed_images(eval_set: EvalSet, root: Path | None = None) -> list[Path]:
    """The images a CSV-based image set names (each must exist), whose content its CSV's hash does not cover; []
    for a folder or a text set. `root`: the project root (None: paths stay relative to the working directory)."""
    if isinstance(eval_set, LabelledImagesSet):
        return image_files.listed_images(image_files.ImageSource(path=eval_set.path, format="csv",
                                                                 column=eval_set.image, package=eval_set.package), root)
    return image_files.listed_images(eval_set.source(), root) if isinstance(eval_set, ImagesSet) else []


def image_hashes(eval_set: EvalSet) -> dict[str, str]:
    """sha256 -> path of every image an image set evaluates on (what no calibration image may be)."""
    if isinstance(eval_set, ImagesSet):
        paths = image_files.list_images(eval_set.source())
    else:
        paths = [image_files.resolve(p) for p in image_labels(eval_set)["path"]]
    return {image_files.image_sha256(p): str(p) for p in paths}


def ranking_metric(similarity: np.ndarray, relevant: list[dict[int, float]], metric: str, k: int = TOP_K) -> float:
    """Mean nDCG@k (linear gain, as trec_eval) or recall@k over queries, x100."""
    values = []
    for row, judged in zip(similarity, relevant):
        top = np.argsort(-row, kind="stable")[:k]
        if metric.startswith("recall"):
            hits = sum(1 for d in top if judged.get(int(d), 0) > 0)
            values.append(hits / max(1, sum(1 for r in judged.values() if r > 0)))
            continue
        dcg = sum(judged.get(int(d), 0.0) / np.log2(i + 2) for i, d in enumerate(top))
        ideal = sorted(judged.values(), reverse=True)[:k]
        idcg = sum(r / np.log2(i + 2) for i, r in enumerate(ideal))
        values.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(values) * 100)


def _retrieval(s: RetrievalSet, cap: int | None, seed: int | None = None) -> EvalData:
    where = f"evaluation set {s.name!r}"
    queries = read_table(s.queries, s.reader, ["id", "text"], where)
    corpus = read_table(s.corpus, s.reader, ["id", "text"], where)
    qrels = _validated(read_table(s.qrels, s.reader, list(RETRIEVAL_QRELS.columns), where), RETRIEVAL_QRELS, s.qrels)
    for frame, path in ((queries, s.queries), (corpus, s.corpus)):
        if frame["id"].duplicated().any():
            raise InputError(f"{path}: duplicate id {frame['id'][frame['id'].duplicated()].iloc[0]!r}; ids must be unique")
    doc_index = {d: i for i, d in enumerate(corpus["id"])}
    unknown = sorted(set(qrels["doc_id"]) - set(doc_index))
    if unknown:
        raise InputError(f"{s.qrels}: doc_id {unknown[0]!r} is not in {s.corpus} (+{len(unknown) - 1} more)")
    judged_queries = _shuffled(queries[queries["id"].isin(set(qrels["query_id"]))].reset_index(drop=True), seed)
    if judged_queries.empty:
        raise InputError(f"{s.qrels}: no query_id matches an id of {s.queries}")

    def build(n: int | None) -> EvalData:
        q = _first(judged_queries, n)
        relevant = [
            {doc_index[d]: float(r) for d, r in zip(g["doc_id"], g["relevance"])}
            for g in (qrels[qrels["query_id"] == qid] for qid in q["id"])
        ]
        # Corpus first: the texts of the first n queries are then a prefix of those of all queries.
        texts = [*corpus["text"], *q["text"]]

        def score(outputs: np.ndarray) -> float:
            dv, qv = outputs[: len(corpus)], outputs[len(corpus):]
            qv = qv / np.linalg.norm(qv, axis=1, keepdims=True)
            dv = dv / np.linalg.norm(dv, axis=1, keepdims=True)
            return ranking_metric(qv @ dv.T, relevant, s.metric)

        return EvalData(s.name, s.metric, texts, len(q), score, subset=lambda k: build(min(k, len(q))),
                        total_items=len(judged_queries))

    return build(cap)


def texts(eval_set: EvalSet) -> set[str]:
    """Every text the set evaluates on, stripped (no labels or scoring read): what no training text may be."""
    where = f"evaluation set {eval_set.name!r}"
    if isinstance(eval_set, IMAGE_SETS):
        return set()
    if isinstance(eval_set, SentencePairsSet):
        return set(unique_pair_texts(_pair_frame(eval_set))[0])
    if isinstance(eval_set, LabelledTextSet):
        return set(read_table(eval_set.path, eval_set.reader, [eval_set.text], where)[eval_set.text].str.strip())
    columns = ["text"]
    found = set()
    for path in (eval_set.queries, eval_set.corpus):
        found |= set(read_table(path, eval_set.reader, columns, where)["text"].str.strip())
    return found


def refuse_evaluated_text(pool: pd.DataFrame, evaluation: EvaluationParams, use: str) -> None:
    """InputError when a row of a text pool (columns sentence, source) is a text of an evaluation set:
    training or calibrating on what is scored makes the score say nothing about other text."""
    sentences = set(pool["sentence"])
    for eval_set in evaluation.sets:
        shared = sentences & texts(eval_set)
        if shared:
            rows = pool[pool["sentence"].isin(shared)]
            where = ", ".join(sorted(set(rows["source"])))
            raise InputError(
                f"{where}: {len(shared)} rows of the {use} are texts of evaluation set {eval_set.name!r} (e.g. "
                f"{rows['sentence'].iloc[0][:60]!r}); never calibrate or distil on what is evaluated: remove "
                "them or use another source"
            )


METRIC_LABELS = {
    "spearman": "Spearman x100",
    "accuracy": "accuracy %",
    "macro_f1": "macro F1 x100",
    "ndcg@10": "nDCG@10 x100",
    "recall@10": "recall@10 x100",
    "top1": "top-1 accuracy %",
    "top5": "top-5 accuracy %",
    "top1_agreement": "top-1 agreement with fp32 (%)",
}


def metric_label(eval_set: str, metric_name: str) -> str:
    """How tables and plots name a metric, e.g. `stsb Spearman x100`."""
    return f"{eval_set} {METRIC_LABELS.get(metric_name, metric_name)}"
