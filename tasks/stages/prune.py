"""Stage prune: structured pruning of attention heads and FFN channels, recovered by distillation.

Reads: the fetched model folder and, when anything is pruned, a CSV of unlabelled text (column
`sentence`; `calibration_data`'s `text_pool.csv`). Writes:

- `model/`: a model folder the family loads: the dense `config.json`, the tokenizer and pooling files,
  `model.safetensors` with the pruned shapes and `prune.json` (`tasks.families.encoder_pruning`).
- `stage.json`: what was pruned per layer, parameter counts before/after, the distillation loss curve,
  times, and the agreement between the pruned and the dense model's outputs on held-out text.

Method: importance per head and FFN channel, selection and slicing as `tasks.families.encoder_pruning`
describes (every architecture of its `LAYOUTS`; one that cannot lose heads says why), then recovery
(`tasks.families.distillation`, skipped when nothing is pruned: the student would equal the teacher) of
the family's exported output on the text, with `heldout_sentences` of the shuffled text never trained on.
With both ratios 0 the output holds the fetched weights bit for bit.

Strength chosen by the budget (`search`): the levels are tried in order, strongest first; each is pruned
and distilled from the dense model, then scored in torch (fp32) on every evaluation set at every sequence
length beside the dense model. The first level whose drop is within `report.accuracy_budget` on every set
is written; `stage.json` holds the walk (scores, drops, encoder weights kept, times). When no level holds,
the last (weakest) one is written and `search.met_budget` is false: the report then recommends dense.
The search scores on the evaluation sets themselves, so it selects on them: the report says so.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from tasks.core.errors import InputError, StageError
from tasks.core.fingerprint import atomic_output_dir, write_stamp
from tasks.core.params import StrictParams
from tasks.data import evaluation
from tasks.data.evaluation import EvaluationParams
from tasks.families import FAMILIES, channel_pruning, encoder_pruning
from tasks.families.base import FamilySettings, LoadedModel
from tasks.families.distillation import DistillSettings, by_length, curve, distill, embed_all

TOOLS = ("torch", "transformers", "safetensors", "numpy", "pandas", "torch-pruning")
MODEL_SUBDIR = "model"


# Settings that only one kind of model reads (the other kind refuses them, naming the field): transformer
# encoders lose heads and FFN channels, image classifiers convolution channels.
ENCODER_ONLY = ("head_ratio", "ffn_ratio", "importance", "importance_sentences", "ffn_multiple")
ENCODER_ONLY_DISTILL = ("max_tokens", "train_embeddings", "cosine_weight", "mse_weight")
IMAGE_ONLY = ("channel_ratio", "channel_multiple", "residual")
IMAGE_ONLY_DISTILL = ("augment_views", "image_size", "recalibrate_bn")


class PruneLevel(StrictParams):
    """One pruning strength the search tries."""

    head_ratio: float = Field(0.0, ge=0, lt=1, description="share of attention heads removed")
    ffn_ratio: float = Field(0.0, ge=0, lt=1, description="share of FFN (intermediate) channels removed")
    channel_ratio: float = Field(0.0, ge=0, lt=1, description="images: share of convolution output channels removed")
    distill_steps: int | None = Field(None, ge=0, description="recovery steps; null = distill.steps")

    @model_validator(mode="after")
    def _prunes(self) -> PruneLevel:
        if self.head_ratio == 0 and self.ffn_ratio == 0 and self.channel_ratio == 0:
            raise ValueError("a search level prunes nothing (all ratios 0); the dense model is always the fallback")
        return self


class PruneSettings(StrictParams):
    """How one model is made from the fetched one; both ratios 0 and no search = the fetched model unchanged."""

    head_ratio: float = Field(0.0, ge=0, lt=1, description="share of attention heads removed")
    ffn_ratio: float = Field(0.0, ge=0, lt=1, description="share of FFN (intermediate) channels removed")
    search: list[PruneLevel] = Field(
        [],
        description="levels tried in order, strongest first; the first within report.accuracy_budget of the dense "
        "model on every evaluation set is kept (instead of head_ratio / ffn_ratio)",
    )
    search_max_items: int | None = Field(
        None, ge=2, description="search: first N items of every evaluation set (null = all)"
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: the ratio in every layer; global: ranked across layers"
    )
    importance: Literal["l1", "activation"] = Field(
        "l1", description="l1: weight norms; activation: contribution to the residual stream on text"
    )
    importance_sentences: int = Field(256, ge=1, description="training sentences used by importance: activation")
    ffn_multiple: int = Field(16, ge=1, description="kept FFN widths are rounded up to a multiple of this")
    channel_ratio: float = Field(
        0.0, ge=0, lt=1, description="images: share of the prunable convolution output channels removed (whole channels, "
        "lowest group L1 norm first; tasks.families.channel_pruning)")
    channel_multiple: int = Field(8, ge=1, description="images: kept channel counts are rounded up to a multiple of this")
    residual: bool = Field(
        False, description="images: also prune the channels residual adds share (the same channels in every block of a "
        "stage); off: only channels one convolution writes (e.g. the expanded channels of inverted-residual blocks)")
    seed: int = Field(0, ge=0, description="held-out split, importance sample and batch order")
    distill: DistillSettings = Field(default_factory=DistillSettings)

    @model_validator(mode="after")
    def _ratios_or_search(self) -> PruneSettings:
        if self.search and (self.head_ratio > 0 or self.ffn_ratio > 0 or self.channel_ratio > 0):
            raise ValueError("give head_ratio / ffn_ratio / channel_ratio or a search, not both (the search sets the ratios)")
        return self

    @property
    def prunes(self) -> bool:
        return self.head_ratio > 0 or self.ffn_ratio > 0 or self.channel_ratio > 0 or bool(self.search)

    def levels(self) -> list[PruneLevel]:
        if self.search:
            return self.search
        ratios = {"head_ratio": self.head_ratio, "ffn_ratio": self.ffn_ratio, "channel_ratio": self.channel_ratio}
        return [PruneLevel(**ratios)] if self.prunes else []

    def at(self, level: PruneLevel) -> PruneSettings:
        """These settings with one level's ratios and steps (and no search)."""
        steps = self.distill.steps if level.distill_steps is None else level.distill_steps
        return self.model_copy(update={"head_ratio": level.head_ratio, "ffn_ratio": level.ffn_ratio,
                                       "channel_ratio": level.channel_ratio, "search": [],
                                       "distill": self.distill.model_copy(update={"steps": steps})})

    def misplaced(self, modality: str) -> str | None:
        """The first setting off its default that a model of `modality` ("text" or "image") does not read, as a
        dotted path under the model's entry; None when all fit."""
        image = modality == "image"
        own, own_distill = (ENCODER_ONLY, ENCODER_ONLY_DISTILL) if image else (IMAGE_ONLY, IMAGE_ONLY_DISTILL)

        def changed(settings, name: str) -> bool:  # a default (e.g. inherited through `extends`) is harmless
            return getattr(settings, name) != type(settings).model_fields[name].get_default(call_default_factory=True)

        for name in own:
            if changed(self, name):
                return name
        for name in own_distill:
            if changed(self.distill, name):
                return f"distill.{name}"
        ratios = ("head_ratio", "ffn_ratio") if image else ("channel_ratio",)
        for i, level in enumerate(self.search):
            for name in ratios:
                if getattr(level, name) > 0:
                    return f"search[{i}].{name}"
        return None


def misplaced_message(model: str, field: str, family: str, modality: str) -> str:
    """One line for a setting the family's kind of model does not read."""
    if modality == "image":
        return (f"prune.models.{model}.{field}: a transformer-encoder setting, but family {family} prunes convolution "
                "channels; remove it (use channel_ratio, channel_multiple, residual, distill.augment_views)")
    return (f"prune.models.{model}.{field}: an image-classifier setting, but family {family} prunes a transformer "
            "encoder; remove it (use head_ratio / ffn_ratio)")


class PruneParams(StrictParams):
    models: dict[str, PruneSettings] = Field(default_factory=lambda: {"dense": PruneSettings()}, min_length=1)

    def model(self, name: str) -> PruneSettings:
        try:
            return self.models[name]
        except KeyError:
            raise InputError(
                f"prune.models: unknown model {name!r}; known: {sorted(self.models)} "
                "(add it under prune.models or fix the name in models)"
            ) from None


def needs_text(settings: PruneSettings) -> bool:
    """Whether the model reads the text pool (or, for an image family, the image pool) as a dependency."""
    return settings.prunes


def read_images(path: Path) -> list[str]:
    """The image paths of calibration_data's image_pool.csv (column `path`), unique, in order."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the distillation images ({exc.__class__.__name__}); pass image_pool.csv") from exc
    if "path" not in frame.columns:
        raise InputError(f"{path}: no column 'path' (columns: {list(frame.columns)}); pass image_pool.csv")
    return list(dict.fromkeys(p for p in frame["path"].str.strip().tolist() if p))


def read_text(path: Path) -> list[str]:
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path}: cannot read the distillation text ({exc.__class__.__name__}); pass text_pool.csv"
        ) from exc
    if "sentence" not in frame.columns:
        raise InputError(f"{path}: no column 'sentence' (columns: {list(frame.columns)}); pass text_pool.csv")
    sentences = [s for s in frame["sentence"].str.strip().tolist() if s]
    return list(dict.fromkeys(sentences))


def _check_text(sentences: list[str], text: Path, model: str, limit: int | None, d: DistillSettings) -> None:
    if limit is not None and d.max_tokens > limit:
        raise InputError(
            f"prune.models.{model}.distill.max_tokens: {d.max_tokens} exceeds what the model takes ({limit}); lower it"
        )
    if len(sentences) < d.heldout_sentences + d.batch_size:
        raise InputError(
            f"{text}: {len(sentences)} unique sentences; prune.models.{model}.distill needs at least "
            f"heldout_sentences + batch_size = {d.heldout_sentences + d.batch_size}"
        )


def _agreement(student, teacher) -> dict[str, float]:
    import torch

    cos = torch.nn.functional.cosine_similarity(student.reshape(len(student), -1), teacher.reshape(len(teacher), -1))
    cos = cos.numpy()
    return {"mean": float(cos.mean()), "p5": float(np.percentile(cos, 5)), "min": float(cos.min())}


def prune_and_distill(impl, family: FamilySettings, teacher: LoadedModel, student: LoadedModel, layout,
                      sentences: list[str], settings: PruneSettings, teacher_outputs: dict | None = None
                      ) -> tuple[list, dict]:
    """Importance, selection, slicing and recovery on `student` (a copy of `teacher`), in place.
    `teacher_outputs`: a dict kept across calls with the same text, seed and max_tokens (a search's levels),
    so the teacher runs over the text once."""
    import torch

    if isinstance(layout, channel_pruning.ChannelLayout):
        return prune_channels(impl, family, teacher, student, sentences, settings, teacher_outputs)
    d = settings.distill
    tokenizer = teacher.preprocessor
    pad_id = tokenizer.pad_token_id

    def collate(batch_ids):
        return impl.collate(batch_ids, pad_id)

    order = np.random.default_rng(settings.seed).permutation(len(sentences))
    heldout = impl.encode(tokenizer, [sentences[i] for i in order[: d.heldout_sentences]], d.max_tokens)
    train = impl.encode(tokenizer, [sentences[i] for i in order[d.heldout_sentences :]], d.max_tokens)

    t0 = time.perf_counter()
    if settings.importance == "l1":
        head_scores, ffn_scores = encoder_pruning.l1_importance(student.model, layout)
    else:
        sample = train[: settings.importance_sentences]
        batches = (collate([sample[i] for i in idx]) for idx in by_length(sample, d.batch_size))
        head_scores, ffn_scores = encoder_pruning.activation_importance(student.model, layout, batches)
    plan = encoder_pruning.select(settings, head_scores, ffn_scores)
    encoder_pruning.apply_plan(student.model, layout, plan)
    importance_s = time.perf_counter() - t0

    teacher_out, _ = impl.export_module(teacher, family)
    student_out, _ = impl.export_module(student, family)
    t0 = time.perf_counter()
    cached = {} if teacher_outputs is None else teacher_outputs
    if "heldout" not in cached:
        cached["heldout"] = embed_all(teacher_out, heldout, collate, d.batch_size)
    held_teacher = cached["heldout"]
    before = _agreement(embed_all(student_out, heldout, collate, d.batch_size), held_teacher)
    if d.steps and "train" not in cached:
        cached["train"] = embed_all(teacher_out, train, collate, d.batch_size)
    targets = cached.get("train")
    teacher_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    frozen = [] if d.train_embeddings else list(encoder_pruning.base_model(student.model).embeddings.parameters())
    losses = (
        distill(student_out, train, collate, targets, impl.distill_loss(d, student_out), d, settings.seed, frozen)
        if d.steps else []
    )
    distill_s = time.perf_counter() - t0
    after = _agreement(embed_all(student_out, heldout, collate, d.batch_size), held_teacher)
    if not all(math.isfinite(x) for x in losses) or not math.isfinite(after["mean"]):
        raise StageError("prune: distillation diverged (non-finite loss); lower distill.lr")
    points = curve(losses)
    report = {
        "distill": {
            "train_sentences": len(train),
            "heldout_sentences": len(heldout),
            "epochs": d.steps * d.batch_size / len(train),
            "loss_first": losses[0] if losses else None,
            "loss_last_window": points[-1]["loss"] if points else None,
            "loss_curve": points,
            "importance_s": importance_s,
            "teacher_outputs_s": teacher_s,
            "distill_s": distill_s,
            "threads": torch.get_num_threads(),
        },
        "heldout_agreement_with_dense": {"before_distill": before, "after_distill": after},
    }
    return plan, report


def _top1(student, teacher) -> float:
    return float((student.argmax(dim=1) == teacher.argmax(dim=1)).double().mean() * 100)


def prune_channels(impl, family: FamilySettings, teacher: LoadedModel, student: LoadedModel, images: list[str],
                   settings: PruneSettings, teacher_outputs: dict | None = None) -> tuple[dict, dict]:
    """Channel pruning of an image classifier (`student`, a copy of `teacher`) in place, then recovery on the
    images (`heldout_sentences` of them, shuffled by the seed, never trained on); the plan and the report."""
    import torch

    d = settings.distill
    size = d.image_size
    order = np.random.default_rng(settings.seed).permutation(len(images))
    heldout_paths = [images[i] for i in order[: d.heldout_sentences]]
    train_paths = [images[i] for i in order[d.heldout_sentences :]]
    cached = {} if teacher_outputs is None else teacher_outputs
    if "inputs" not in cached:  # a search's levels share the images, their views and the teacher's outputs
        views = impl.augment(teacher.preprocessor, train_paths, size, d.augment_views, settings.seed) if d.augment_views else []
        cached["inputs"] = (impl.encode(teacher.preprocessor, heldout_paths, size),
                            impl.encode(teacher.preprocessor, train_paths, size) + views)
    heldout, train = cached["inputs"]

    def collate(batch):
        return impl.collate(batch, None)

    teacher_out, _ = impl.export_module(teacher, family)
    student_out, _ = impl.export_module(student, family)
    t0 = time.perf_counter()
    example = next(iter(collate(train[:1]).values()))
    groups = channel_pruning.analyse(student_out, student.model, example)
    chosen = channel_pruning.prunable(groups, settings.residual)
    if not groups:
        raise InputError("prune: this model has no convolution whose output channels can be pruned (e.g. a ViT: its "
                         "only convolution feeds the residual stream through LayerNorms); use models: [dense]")
    if not chosen:
        raise InputError(f"prune: none of the model's {len(groups)} convolution channel groups can be pruned "
                         f"({sum(g.residual for g in groups)} shared by residual adds, the rest hold layers this "
                         "cannot slice); set residual: true or use models: [dense]")
    plan = channel_pruning.select(student.model, chosen, settings.channel_ratio, settings.scope, settings.channel_multiple)
    channel_pruning.apply_plan(student.model, plan)
    importance_s = time.perf_counter() - t0
    held_sliced = embed_all(student_out, heldout, collate, d.batch_size)
    if d.recalibrate_bn:
        channel_pruning.recalibrate_bn(student_out, [collate(train[i : i + d.batch_size]) for i in
                                                     range(0, len(train), d.batch_size)])

    t0 = time.perf_counter()
    if "heldout" not in cached:
        cached["heldout"] = embed_all(teacher_out, heldout, collate, d.batch_size)
    if d.steps and "train" not in cached:
        cached["train"] = embed_all(teacher_out, train, collate, d.batch_size)
    teacher_s = time.perf_counter() - t0
    held_teacher = cached["heldout"]
    held_before = embed_all(student_out, heldout, collate, d.batch_size)
    t0 = time.perf_counter()
    losses = (distill(student_out, train, collate, cached["train"], impl.distill_loss(d, student_out), d, settings.seed)
              if d.steps else [])
    distill_s = time.perf_counter() - t0
    held_after = embed_all(student_out, heldout, collate, d.batch_size)
    if not all(math.isfinite(x) for x in losses) or not bool(torch.isfinite(held_after).all()):
        raise StageError("prune: distillation diverged (non-finite loss); lower distill.lr")
    points = curve(losses)
    skipped = [{"root": g.root, "channels": g.size, "why": g.unsupported or "shared by a residual add (residual: false)"}
               for g in groups if g not in chosen]
    report = {
        "groups": {"found": len(groups), "pruned": len(chosen), "left_whole": skipped},
        "distill": {
            "train_images": len(train_paths),
            "train_views": len(train),
            "heldout_images": len(heldout),
            "image_size": size,
            "augment_views": d.augment_views,
            "temperature": d.temperature,
            "epochs": d.steps * d.batch_size / max(1, len(train)),
            "loss_first": losses[0] if losses else None,
            "loss_last_window": points[-1]["loss"] if points else None,
            "loss_curve": points,
            "importance_s": importance_s,
            "teacher_outputs_s": teacher_s,
            "distill_s": distill_s,
            "threads": torch.get_num_threads(),
        },
        "heldout_agreement_with_dense": {
            "sliced": {**_agreement(held_sliced, held_teacher), "top1": _top1(held_sliced, held_teacher)},
            "before_distill": {**_agreement(held_before, held_teacher), "top1": _top1(held_before, held_teacher)},
            "after_distill": {**_agreement(held_after, held_teacher), "top1": _top1(held_after, held_teacher)},
        },
    }
    return plan, report


class Scorer:
    """Every evaluation set at every sequence length, scored in torch on a model's exported output."""

    def __init__(self, impl, family: FamilySettings, model_dir: Path, sets: EvaluationParams, seq_lens: list[int],
                 max_items: int | None, batch_size: int):
        self.impl, self.family, self.batch_size = impl, family, batch_size
        class_names = impl.class_names(Path(model_dir))
        self.data = [evaluation.load(s, class_names, max_items) for s in sets.sets]
        self.seq_lens = list(seq_lens)
        self.encoded: dict[str, list] = {}
        self.reference: dict[str, np.ndarray] = {}
        """A set scored against the fp32 model's outputs (top-1 agreement) takes the first model scored (dense)."""

    def scores(self, loaded: LoadedModel) -> dict[str, float]:
        module, _ = self.impl.export_module(loaded, self.family)
        pad_id = getattr(loaded.preprocessor, "pad_token_id", None)
        out = {}
        for data in self.data:
            for seq_len in self.seq_lens:
                where = f"{data.name}@{seq_len}"
                if where not in self.encoded:
                    self.encoded[where] = self.impl.encode(loaded.preprocessor, data.inputs, seq_len)
                ids = self.encoded[where]
                outputs = embed_all(module, ids, lambda b: self.impl.collate(b, pad_id), self.batch_size).numpy()
                if data.needs_reference:
                    out[where] = data.score(outputs, self.reference.setdefault(where, outputs))
                else:
                    out[where] = data.score(outputs)
        return out

    def drops(self, dense: dict[str, float], scores: dict[str, float]) -> dict[str, float]:
        """Points lost against dense per set@length (positive = worse, whatever the metric's direction)."""
        sign = {f"{d.name}@{L}": 1.0 if d.higher_is_better else -1.0 for d in self.data for L in self.seq_lens}
        return {k: sign[k] * (dense[k] - scores[k]) for k in dense}


def _refuse_evaluated(sentences: list[str], text: Path, sets: EvaluationParams) -> None:
    pool = pd.DataFrame({"sentence": sentences, "source": Path(text).as_posix()})
    evaluation.refuse_evaluated_text(pool, sets, "distillation text")


def _pruned_weights(model, layout) -> int:
    """The weights pruning works on: an encoder's layers, or all of an image classifier."""
    if isinstance(layout, channel_pruning.ChannelLayout):
        return int(sum(p.numel() for p in model.parameters()))
    return encoder_pruning.count_params(model, layout)["encoder_layers"]


def search_levels(impl, family: FamilySettings, teacher: LoadedModel, layout, sentences: list[str],
                  settings: PruneSettings, scorer: Scorer, budget: float) -> tuple[LoadedModel, list, dict]:
    """The first level within `budget` on every set (else the last one tried), its plan, and the walk."""
    dense = scorer.scores(teacher)
    walk, chosen, teacher_outputs = [], None, {}
    base = _pruned_weights(teacher.model, layout)
    for i, level in enumerate(settings.levels()):
        t0 = time.perf_counter()
        student = LoadedModel(teacher.folder, teacher.preprocessor, copy.deepcopy(teacher.model), teacher.config)
        plan, report = prune_and_distill(impl, family, teacher, student, layout, sentences, settings.at(level),
                                         teacher_outputs)
        scores = scorer.scores(student)
        drops = scorer.drops(dense, scores)
        within = all(d <= budget for d in drops.values())
        walk.append({
            **level.model_dump(mode="json"),
            "encoder_weights_kept": _pruned_weights(student.model, layout) / base,
            "scores": scores, "drops": drops, "worst_drop": max(drops.values()), "within_budget": within,
            "heldout_agreement_with_dense": report["heldout_agreement_with_dense"]["after_distill"]["mean"],
            "time_s": time.perf_counter() - t0,
        })
        ratios = ", ".join(f"{label} -{getattr(level, name):.0%}" for name, label in
                           (("head_ratio", "heads"), ("ffn_ratio", "FFN"), ("channel_ratio", "channels"))
                           if getattr(level, name) > 0)
        print(f"prune search: level {i + 1}/{len(settings.levels())} ({ratios}): worst drop {walk[-1]['worst_drop']:.2f} points "
              f"({'within' if within else 'over'} the budget of {budget})", flush=True)
        if within:
            chosen = i
            break
    search = {"budget": budget, "dense": dense, "levels": walk, "chosen": chosen, "met_budget": chosen is not None,
              "selected_on": "the evaluation sets (the budget check downstream is not independent of this choice)"}
    return student, plan, {**report, "search": search}


def _pass_through(model_dir: Path, model: str, settings: PruneSettings, impl, out_dir: Path, key: str,
                  started: float) -> dict:
    """The model folder's files copied unchanged, for a family without pruning (the dense model)."""
    payload = {"model": model, "settings": settings.model_dump(mode="json"), "distill": {"skipped": "nothing pruned"},
               "copied": [p.relative_to(model_dir).as_posix() for p in impl.folder_files(model_dir)]}
    with atomic_output_dir(out_dir) as scratch:
        folder = scratch / MODEL_SUBDIR
        folder.mkdir()
        for name in payload["copied"]:
            shutil.copy2(model_dir / name, folder / name)
        payload["time_s"] = time.perf_counter() - started
        write_stamp(scratch, key, payload)
    return payload


def run(*, model_dir: Path, text: Path | None, model: str, params: PruneParams, family: FamilySettings,
        evaluation_params: EvaluationParams, accuracy_budget: float, seq_lens: list[int], out_dir: Path,
        key: str) -> dict:
    """`evaluation_params`, `accuracy_budget`, `seq_lens`: what a search scores levels on (unused without one)."""
    settings = params.model(model)
    impl = FAMILIES.get(family.name)
    started = time.perf_counter()
    if (Path(model_dir) / encoder_pruning.PRUNE_JSON).is_file():
        raise InputError(f"{model_dir}: already pruned ({encoder_pruning.PRUNE_JSON}); prune the fetched model folder")
    misplaced = settings.misplaced(impl.modality)
    if misplaced:
        raise InputError(misplaced_message(model, misplaced, family.name, impl.modality))
    if not impl.prunable and not settings.prunes:
        return _pass_through(Path(model_dir), model, settings, impl, out_dir, key, started)
    teacher = impl.load(Path(model_dir), family, "eager")
    layout = impl.pruning_layout(teacher.config)
    if isinstance(layout, channel_pruning.ChannelLayout):
        settings = settings.model_copy(update={"distill": settings.distill.model_copy(
            update={"image_size": settings.distill.image_size or seq_lens[0]})})
        return _run_channels(impl, family, teacher, layout, Path(model_dir), Path(text) if text else None, model,
                             settings, evaluation_params, accuracy_budget, seq_lens, out_dir, key, started)
    if any(level.head_ratio > 0 for level in settings.levels()) and layout.no_head_pruning:
        raise InputError(f"prune.models.{model}.head_ratio: {layout.no_head_pruning}")
    base_shapes = encoder_pruning.layer_shapes(teacher.model, layout)
    base_params = encoder_pruning.count_params(teacher.model, layout)
    student = LoadedModel(teacher.folder, teacher.preprocessor, copy.deepcopy(teacher.model), teacher.config)

    payload: dict = {"model": model, "settings": settings.model_dump(mode="json")}
    if settings.prunes:
        if text is None:
            raise InputError(f"prune.models.{model}: prunes, so it needs the distillation text (text_pool.csv)")
        sentences = read_text(Path(text))
        _check_text(sentences, Path(text), model, impl.max_shape(teacher), settings.distill)
        _refuse_evaluated(sentences, Path(text), evaluation_params)
        if settings.search:
            scorer = Scorer(impl, family, Path(model_dir), evaluation_params, seq_lens, settings.search_max_items,
                            settings.distill.batch_size)
            student, plan, report = search_levels(impl, family, teacher, layout, sentences, settings, scorer,
                                                  accuracy_budget)
        else:
            plan, report = prune_and_distill(impl, family, teacher, student, layout, sentences, settings)
        payload.update(report)
    else:
        plan = [{"heads": list(range(b["heads"])), "ffn_channels": list(range(b["ffn"]))} for b in base_shapes]
        # A no-op slice: the same code path as pruning, checked bit-exact by tests.
        encoder_pruning.apply_plan(student.model, layout, plan)
        payload["distill"] = {"skipped": "nothing pruned"}

    shapes = encoder_pruning.layer_shapes(student.model, layout)
    payload["layers"] = [
        {
            "heads_kept": keep["heads"],
            "heads": s["heads"],
            "heads_removed": b["heads"] - s["heads"],
            "ffn": s["ffn"],
            "ffn_removed": b["ffn"] - s["ffn"],
        }
        for keep, s, b in zip(plan, shapes, base_shapes)
    ]
    payload["params_before"] = base_params
    payload["params_after"] = encoder_pruning.count_params(student.model, layout)
    payload["params_ratio"] = payload["params_after"]["encoder_layers"] / base_params["encoder_layers"]

    with atomic_output_dir(out_dir) as scratch:
        folder = scratch / MODEL_SUBDIR
        encoder_pruning.save_pruned(student.model, teacher.preprocessor, layout, plan, base_shapes[0], folder)
        # Files the family reads beside the weights (e.g. the pooling config) that save_pretrained does not write.
        for source in impl.folder_files(Path(model_dir)):
            target = folder / source.relative_to(model_dir)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        payload["time_s"] = time.perf_counter() - started
        write_stamp(scratch, key, payload)
    return payload


def _run_channels(impl, family: FamilySettings, teacher: LoadedModel, layout, model_dir: Path, images: Path | None,
                  model: str, settings: PruneSettings, evaluation_params: EvaluationParams, accuracy_budget: float,
                  seq_lens: list[int], out_dir: Path, key: str, started: float) -> dict:
    """An image classifier: convolution channels pruned (or a no-op slice when nothing is), recovered, saved."""
    import torch

    size = settings.distill.image_size
    example = torch.zeros((1, 3, size, size))
    teacher_module, _ = impl.export_module(teacher, family)
    base_shapes = channel_pruning.shapes(teacher.model)
    base_counts = channel_pruning.count(teacher_module, teacher.model, example)
    payload: dict = {"model": model, "settings": settings.model_dump(mode="json")}
    if settings.prunes:
        if images is None:
            raise InputError(f"prune.models.{model}: prunes, so it needs the distillation images (image_pool.csv)")
        paths = read_images(images)
        d = settings.distill
        if len(paths) < d.heldout_sentences + 1:
            raise InputError(f"{images}: {len(paths)} images; prune.models.{model}.distill.heldout_sentences "
                             f"({d.heldout_sentences}) must leave at least one to train on; lower it")
        # The pool is calibration_data's, which refused every evaluated image by content hash.
        if settings.search:
            scorer = Scorer(impl, family, model_dir, evaluation_params, seq_lens, settings.search_max_items,
                            settings.distill.batch_size)
            student, plan, report = search_levels(impl, family, teacher, layout, paths, settings, scorer,
                                                  accuracy_budget)
        else:
            student = LoadedModel(teacher.folder, teacher.preprocessor, copy.deepcopy(teacher.model), teacher.config)
            plan, report = prune_channels(impl, family, teacher, student, paths, settings)
        payload.update(report)
    else:
        student = LoadedModel(teacher.folder, teacher.preprocessor, copy.deepcopy(teacher.model), teacher.config)
        student_module, _ = impl.export_module(student, family)
        groups = channel_pruning.analyse(student_module, student.model, example)
        plan = channel_pruning.select(student.model, channel_pruning.prunable(groups, settings.residual), 0.0,
                                      settings.scope, settings.channel_multiple)
        # A no-op slice: the same code path as pruning, checked bit-exact by tests.
        channel_pruning.apply_plan(student.model, plan)
        payload["distill"] = {"skipped": "nothing pruned"}

    student_module, _ = impl.export_module(student, family)
    after_shapes = channel_pruning.shapes(student.model)
    payload["layers"] = [{"name": name, "out": after_shapes[name][0], "out_removed": out - after_shapes[name][0],
                          "in": after_shapes[name][1], "in_removed": inp - after_shapes[name][1]}
                         for name, (out, inp) in base_shapes.items()]
    payload["params_before"] = {"total": base_counts["params"]}
    payload["params_after"] = {"total": channel_pruning.count(student_module, student.model, example)["params"]}
    payload["params_ratio"] = payload["params_after"]["total"] / payload["params_before"]["total"]
    payload["macs_before"] = base_counts["macs"]
    payload["macs_after"] = channel_pruning.count(student_module, student.model, example)["macs"]
    payload["macs_ratio"] = payload["macs_after"] / payload["macs_before"]
    payload["macs_image_size"] = size

    with atomic_output_dir(out_dir) as scratch:
        folder = scratch / MODEL_SUBDIR
        channel_pruning.save(student.model, plan, payload["settings"], folder)
        for source in impl.folder_files(model_dir):
            target = folder / source.relative_to(model_dir)
            if not target.exists():
                shutil.copy2(source, target)
        payload["time_s"] = time.perf_counter() - started
        write_stamp(scratch, key, payload)
    return payload
