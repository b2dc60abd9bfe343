"""Stage prune: structured pruning of attention heads and FFN channels, recovered by distillation.

Reads: the fetched HF folder (`config.json`, tokenizer, `model.safetensors`) and, when anything is
pruned, a CSV of unlabelled sentences (column `sentence`; `calibration_data`'s `text_pool.csv`:
STS-B train + dev, never test). Writes:

- `model/`: an HF folder `tasks.export_onnx.load_encoder` loads: the dense `config.json`, the
  tokenizer files, `model.safetensors` with the pruned shapes and `prune.json` (per layer: the
  original indices of the kept heads and the kept FFN width). `load_pruned` rebuilds the dense
  architecture from the config, narrows each layer to those shapes and loads the weights strictly.
- `stage.json`: what was pruned per layer, parameter counts before/after, the distillation loss
  curve, times, and the cosine between the pruned and the dense embedding on held-out sentences.

Method
------
1. Importance, per head and per FFN channel of every layer (`importance`):
   `l1`: the L1 norm of the unit's weights: a head's rows of query/key/value plus its columns of the
   attention output projection; a channel's row of the intermediate projection plus its column of
   the FFN output projection.
   `activation`: the mean L1 norm (over real tokens of `importance_sentences` training sentences)
   of the unit's contribution to the residual stream: head h adds context_h @ W_o[:, h]^T, channel
   j adds act_j * W_out[:, j]. Units that write little into the residual stream go first.
2. Selection (`scope`): `layer` removes round(ratio * n) units of every layer (the same shapes in
   every layer); `global` ranks all layers' units together after dividing each layer's scores by
   their L2 norm (Michel et al. 2019: raw norms differ in scale between layers) and removes the
   lowest round(ratio * total). Every layer keeps at least one head and `ffn_multiple` channels;
   FFN widths are rounded up to a multiple of `ffn_multiple` (GEMM kernels prefer aligned widths).
3. Slicing: query/key/value lose the rows of removed heads, the attention output projection the
   matching input columns, the FFN intermediate projection rows and the FFN output projection
   columns; each self-attention module's `num_attention_heads`/`all_head_size` is set to the kept
   count so eager and sdpa attention reshape to the smaller head count. Kept units keep their order.
4. Distillation (`distill`, skipped when nothing is pruned: the student would equal the teacher):
   the pruned model (student) learns to reproduce the dense model's (teacher's) mean-pooled,
   L2-normalised sentence embedding, the exact output of the exported ONNX, on unlabelled text:
   loss = cosine_weight * (1 - cos) + mse_weight * MSE. (On unit vectors MSE = 2 (1 - cos) / hidden,
   so the two differ only in scale.) AdamW with linear warm-up and decay, gradient clipping, no
   dropout (the target is deterministic and the text small). `heldout_sentences` of the shuffled
   text are never trained on; the student's cosine to the teacher on them is reported before and
   after distillation. The same seed, text and thread count give bit-identical weights.

With both ratios 0 the output holds the fetched weights bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.errors import InputError, StageError
from tasks.fingerprint import atomic_output_dir, write_stamp

TOOLS = ("torch", "transformers", "safetensors", "numpy", "pandas")
MODEL_SUBDIR = "model"
PRUNE_JSON = "prune.json"
WEIGHTS = "model.safetensors"
PRUNE_FORMAT = 1
LOSS_CURVE_POINTS = 20
# Batches sorted by length together in distillation (see batch_plan); more = less padding, less randomness.
BUCKET_BATCHES = 50


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DistillSettings(_Settings):
    """Recovery by knowledge distillation from the unpruned model on unlabelled text."""

    steps: int = Field(600, ge=0, description="optimizer steps; 0 = no recovery (600 x 32 = 1.5 epochs of STS-B)")
    lr: float = Field(1e-4, gt=0, le=1e-2, description="AdamW peak learning rate")
    batch_size: int = Field(32, ge=1, le=1024, description="sentences per step")
    max_tokens: int = Field(128, ge=4, description="sentences are truncated to this many tokens")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps with a linear learning-rate warm-up")
    weight_decay: float = Field(0.01, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (L2 norm over all weights)")
    cosine_weight: float = Field(1.0, ge=0, description="weight of 1 - cos(student, teacher)")
    mse_weight: float = Field(0.0, ge=0, description="weight of the MSE between the normalised embeddings")
    heldout_sentences: int = Field(500, ge=1, description="text rows kept out of training for the cosine check")
    train_embeddings: bool = Field(
        False,
        description="also train the (unpruned) embedding tables; off: the 30k-row word table would dominate "
        "each optimizer step, and pruning does not touch it",
    )

    @model_validator(mode="after")
    def _some_loss(self) -> DistillSettings:
        if self.cosine_weight == 0 and self.mse_weight == 0:
            raise ValueError("distill: cosine_weight and mse_weight are both 0; give one a positive weight")
        return self


class PruneSettings(_Settings):
    """How one model is made from the fetched one; both ratios 0 = the fetched model unchanged."""

    head_ratio: float = Field(0.0, ge=0, lt=1, description="share of attention heads removed")
    ffn_ratio: float = Field(0.0, ge=0, lt=1, description="share of FFN (intermediate) channels removed")
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: the ratio in every layer; global: ranked across layers"
    )
    importance: Literal["l1", "activation"] = Field(
        "l1", description="l1: weight norms; activation: contribution to the residual stream on text"
    )
    importance_sentences: int = Field(256, ge=1, description="training sentences used by importance: activation")
    ffn_multiple: int = Field(16, ge=1, description="kept FFN widths are rounded up to a multiple of this")
    seed: int = Field(0, ge=0, description="held-out split, importance sample and batch order")
    distill: DistillSettings = Field(default_factory=DistillSettings)

    @property
    def prunes(self) -> bool:
        return self.head_ratio > 0 or self.ffn_ratio > 0


def _default_models() -> dict[str, PruneSettings]:
    return {
        "dense": PruneSettings(),
        # all-MiniLM-L6-v2, ORT CPU fp32, seq 128, 2 threads: 1.7x faster than dense, STS-B test Spearman
        # 81.80 vs 82.03 (held-out cosine to dense 0.60 before, 0.89 after 600 steps, ~4 min on 2 cores).
        "pruned": PruneSettings(head_ratio=0.25, ffn_ratio=0.5),
    }


class PruneParams(_Settings):
    models: dict[str, PruneSettings] = Field(default_factory=_default_models, min_length=1)

    def model(self, name: str) -> PruneSettings:
        try:
            return self.models[name]
        except KeyError:
            raise InputError(
                f"prune.models: unknown model {name!r}; known: {sorted(self.models)} "
                "(add it under prune.models or fix the name in models)"
            ) from None


def needs_text(settings: PruneSettings) -> bool:
    """Whether the model reads the text pool (so callers can skip it as a dependency)."""
    return settings.prunes


# --------------------------------------------------------------------------- model structure


def _layers(model) -> list:
    """The encoder layers of a BERT-family model, checked to have the parts pruning slices."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    parts += ("intermediate.dense", "output.dense")
    if layers is None or not all(_has(layer, p) for layer in layers for p in parts):
        raise InputError(
            f"model_type {model.config.model_type!r}: prune supports BERT-family encoders "
            "(encoder.layer[i] with attention.self.query/key/value, intermediate.dense, output.dense)"
        )
    return list(layers)


def _has(module, dotted: str) -> bool:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return False
    return True


def _sliced(linear, index, dim: int):
    """A new nn.Linear holding only `index` of the output rows (dim 0) or input columns (dim 1)."""
    import torch

    weight = linear.weight.detach().index_select(dim, index)
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            # Input columns removed (dim 1): every output row stays, and so does its bias.
            new.bias.copy_(linear.bias.index_select(0, index) if dim == 0 else linear.bias)
    return new


def prune_layer(layer, heads: list[int], ffn_channels: list[int]) -> None:
    """Keep only `heads` (original head indices) and `ffn_channels` of one encoder layer, in place."""
    import torch

    attn = layer.attention.self
    d = attn.attention_head_size
    rows = torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long)
    attn.query = _sliced(attn.query, rows, 0)
    attn.key = _sliced(attn.key, rows, 0)
    attn.value = _sliced(attn.value, rows, 0)
    layer.attention.output.dense = _sliced(layer.attention.output.dense, rows, 1)
    attn.num_attention_heads = len(heads)
    attn.all_head_size = len(heads) * d

    channels = torch.tensor(ffn_channels, dtype=torch.long)
    layer.intermediate.dense = _sliced(layer.intermediate.dense, channels, 0)
    layer.output.dense = _sliced(layer.output.dense, channels, 1)


def layer_shapes(model) -> list[dict]:
    return [
        {"heads": int(layer.attention.self.num_attention_heads), "ffn": int(layer.intermediate.dense.out_features)}
        for layer in _layers(model)
    ]


def count_params(model) -> dict[str, int]:
    encoder = sum(p.numel() for p in model.encoder.parameters())
    return {"total": int(sum(p.numel() for p in model.parameters())), "encoder_layers": int(encoder)}


# --------------------------------------------------------------------------- importance


def _head_view(layer):
    """Per-head weights: q/k/v rows [H, d, hidden] and output-projection columns [hidden, H, d]."""
    attn = layer.attention.self
    heads, d = attn.num_attention_heads, attn.attention_head_size
    qkv = [m.weight.detach().reshape(heads, d, -1) for m in (attn.query, attn.key, attn.value)]
    out = layer.attention.output.dense.weight.detach().reshape(-1, heads, d)
    return qkv, out


def l1_importance(model) -> tuple[list, list]:
    """Per layer: head scores [H] and FFN channel scores [I] from weight L1 norms."""
    heads, ffn = [], []
    for layer in _layers(model):
        qkv, out = _head_view(layer)
        heads.append(sum(w.abs().sum(dim=(1, 2)) for w in qkv) + out.abs().sum(dim=(0, 2)))
        w_in = layer.intermediate.dense.weight.detach()
        w_out = layer.output.dense.weight.detach()
        ffn.append(w_in.abs().sum(dim=1) + w_out.abs().sum(dim=0))
    return heads, ffn


def activation_importance(model, batches) -> tuple[list, list]:
    """Per layer: mean L1 norm of each head's / FFN channel's contribution to the residual stream."""
    import torch

    layers = _layers(model)
    heads = [torch.zeros(layer.attention.self.num_attention_heads, dtype=torch.float64) for layer in layers]
    ffn = [torch.zeros(layer.intermediate.dense.out_features, dtype=torch.float64) for layer in layers]
    state = {"mask": None, "tokens": 0}

    def head_hook(i):
        def hook(module, args):
            ctx = args[0][state["mask"]]  # [real tokens, H * d]
            _, out = _head_view(layers[i])
            ctx = ctx.reshape(ctx.shape[0], out.shape[1], out.shape[2])
            heads[i] += torch.einsum("nhd,ohd->nho", ctx, out).abs().sum(dim=(0, 2)).double()

        return hook

    def ffn_hook(i):
        def hook(module, args):
            act = args[0][state["mask"]]  # [real tokens, I]
            ffn[i] += (act.abs().sum(dim=0) * module.weight.detach().abs().sum(dim=0)).double()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.attention.output.dense.register_forward_pre_hook(head_hook(i)))
        handles.append(layer.output.dense.register_forward_pre_hook(ffn_hook(i)))
    try:
        with torch.no_grad():
            for batch in batches:
                state["mask"] = batch["attention_mask"].bool()
                state["tokens"] += int(state["mask"].sum())
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [h / state["tokens"] for h in heads], [f / state["tokens"] for f in ffn]


# --------------------------------------------------------------------------- selection


def keep_counts(scores: list, ratio: float, scope: str, minimum: int, multiple: int = 1) -> list[int]:
    """How many units each layer keeps (see the module docstring, step 2)."""
    import torch

    sizes = [len(s) for s in scores]
    if scope == "layer":
        kept = [n - math.floor(ratio * n + 0.5) for n in sizes]
    else:
        flat = torch.cat([s.double() / s.double().norm().clamp(min=1e-30) for s in scores])
        layer_of = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
        removed = layer_of[torch.argsort(flat, stable=True)[: math.floor(ratio * len(flat) + 0.5)]]
        kept = [n - int((removed == i).sum()) for i, n in enumerate(sizes)]
    return [min(n, max(minimum, math.ceil(k / multiple) * multiple)) for k, n in zip(kept, sizes)]


def top_units(scores, count: int) -> list[int]:
    """Indices of the `count` highest scores, in their original order (ties: lower index wins)."""
    import torch

    order = torch.argsort(-scores.double(), stable=True)[:count]
    return sorted(int(i) for i in order)


def select(settings: PruneSettings, head_scores: list, ffn_scores: list) -> list[dict]:
    """Per layer: kept heads and FFN channels (original indices)."""
    n_heads = keep_counts(head_scores, settings.head_ratio, settings.scope, minimum=1)
    n_ffn = keep_counts(
        ffn_scores, settings.ffn_ratio, settings.scope, minimum=settings.ffn_multiple, multiple=settings.ffn_multiple
    )
    return [
        {"heads": top_units(h, nh), "ffn_channels": top_units(f, nf)}
        for h, f, nh, nf in zip(head_scores, ffn_scores, n_heads, n_ffn)
    ]


def apply_plan(model, plan: list[dict]) -> None:
    for layer, keep in zip(_layers(model), plan):
        prune_layer(layer, keep["heads"], keep["ffn_channels"])


# --------------------------------------------------------------------------- saving and loading


def _prune_spec(model, plan: list[dict]) -> dict:
    attn = _layers(model)[0].attention.self
    return {
        "format": PRUNE_FORMAT,
        "head_size": int(attn.attention_head_size),
        "base_heads": int(model.config.num_attention_heads),
        "base_intermediate_size": int(model.config.intermediate_size),
        "layers": [{"heads": keep["heads"], "intermediate_size": len(keep["ffn_channels"])} for keep in plan],
    }


def save_pruned(model, tokenizer, plan: list[dict], folder: Path) -> None:
    """The pruned model as an HF folder plus `prune.json` (dense config: HF has no per-layer sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / PRUNE_JSON).write_text(json.dumps(_prune_spec(model, plan), indent=2) + "\n", encoding="utf-8")


def read_spec(model_dir: Path) -> dict | None:
    """`prune.json` of a pruned folder, validated; None for an ordinary (dense) HF folder."""
    path = Path(model_dir) / PRUNE_JSON
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        layers = spec["layers"]
        ok = spec["format"] == PRUNE_FORMAT and all(
            isinstance(layer["heads"], list) and layer["heads"] and int(layer["intermediate_size"]) >= 1
            for layer in layers
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a prune spec ({exc.__class__.__name__}); re-run the prune stage") from exc
    if not ok:
        raise InputError(f"{path}: unsupported format or an empty layer; re-run the prune stage")
    return spec


def load_pruned(model_dir: Path, attn_implementation: str):
    """The encoder of a pruned folder: dense architecture from config.json, narrowed per prune.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir), attn_implementation=attn_implementation)
    layers = _layers(model)
    if len(spec["layers"]) != len(layers):
        raise InputError(
            f"{model_dir / PRUNE_JSON}: {len(spec['layers'])} layers, config.json has {len(layers)}; "
            "re-run the prune stage"
        )
    # The freshly initialised weights only carry the shapes; the checkpoint overwrites every one.
    for layer, shape in zip(layers, spec["layers"]):
        prune_layer(layer, list(range(len(shape["heads"]))), list(range(int(shape["intermediate_size"]))))
    try:
        model.load_state_dict(load_file(model_dir / WEIGHTS), strict=True)
    except (OSError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise InputError(
            f"{model_dir / WEIGHTS}: does not match {PRUNE_JSON} ({first}); re-run the prune stage"
        ) from exc
    return model.eval()


# --------------------------------------------------------------------------- text and distillation


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


def encode(tokenizer, sentences: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids per sentence (with [CLS]/[SEP]), truncated to max_tokens; tokenised once, batched later."""
    return tokenizer(sentences, truncation=True, max_length=max_tokens)["input_ids"]


def collate(ids: list[list[int]], pad_id: int) -> dict:
    """One batch padded to its longest sentence; token_type_ids all 0 as for one sentence in the ONNX."""
    import torch

    input_ids = torch.full((len(ids), max(map(len, ids))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


def _by_length(ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length (little padding), in length order."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def embed_all(embedder, ids: list[list[int]], pad_id: int, batch_size: int):
    """Embeddings [N, hidden] in the order of `ids`, computed in length-sorted batches."""
    import torch

    out = None
    with torch.no_grad():
        for idx in _by_length(ids, batch_size):
            emb = embedder(**collate([ids[i] for i in idx], pad_id))
            out = emb.new_empty((len(ids), emb.shape[1])) if out is None else out
            out[torch.from_numpy(idx)] = emb
    return out


def batch_plan(lengths: np.ndarray, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` index batches: each epoch is shuffled, cut into pools of BUCKET_BATCHES batches that are
    sorted by length (random batches of STS-B sentences are mostly padding), then the batches of the
    epoch are shuffled, so consecutive steps still see unrelated lengths and sentences."""
    batches: list[np.ndarray] = []
    pool = batch_size * BUCKET_BATCHES
    while len(batches) < steps:
        perm = rng.permutation(len(lengths))
        epoch = []
        for start in range(0, len(perm), pool):
            chunk = perm[start : start + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        batches += [epoch[i] for i in rng.permutation(len(epoch))]
    return batches[:steps]


def _cosine_summary(student, teacher) -> dict[str, float]:
    cos = (student * teacher).sum(dim=1).numpy()  # both L2-normalised
    return {"mean": float(cos.mean()), "p5": float(np.percentile(cos, 5)), "min": float(cos.min())}


def _loss_fn(settings: DistillSettings):
    import torch

    def loss(student, teacher):
        value = settings.cosine_weight * (1 - (student * teacher).sum(dim=1)).mean()
        if settings.mse_weight:
            value = value + settings.mse_weight * torch.nn.functional.mse_loss(student, teacher)
        return value

    return loss


def distill(student, ids: list[list[int]], pad_id: int, targets, settings: DistillSettings, seed: int) -> list[float]:
    """Train `student` (a sentence embedder) towards `targets` (teacher embeddings of `ids`); per-step losses."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    plan = batch_plan(np.array([len(x) for x in ids]), settings.batch_size, settings.steps, np.random.default_rng(seed))
    if not settings.train_embeddings:
        for weight in student.encoder.embeddings.parameters():
            weight.requires_grad_(False)
    trained = [w for w in student.parameters() if w.requires_grad]
    warmup = max(1, int(settings.steps * settings.warmup_ratio))
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (settings.steps - s) / max(1, settings.steps - warmup)))
    )
    loss_fn = _loss_fn(settings)
    student.eval()  # no dropout: see the module docstring
    losses = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    try:
        with progress:
            task = progress.add_task("distilling", total=settings.steps)
            for idx in plan:
                loss = loss_fn(student(**collate([ids[i] for i in idx], pad_id)), targets[torch.from_numpy(idx)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, settings.max_grad_norm)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                progress.update(task, advance=1, description=f"distilling (loss {losses[-1]:.4f})")
    finally:
        for weight in student.parameters():
            weight.requires_grad_(True)
    return losses


def _curve(losses: list[float]) -> list[dict]:
    """Mean loss over LOSS_CURVE_POINTS equal windows of steps."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(LOSS_CURVE_POINTS, len(losses)) + 1).astype(int)
    return [{"step": int(b), "loss": float(np.mean(losses[a:b]))} for a, b in zip(edges[:-1], edges[1:])]


# --------------------------------------------------------------------------- stage


def _check_text(sentences: list[str], text: Path, model: str, teacher, d: DistillSettings) -> None:
    max_pos = getattr(teacher.config, "max_position_embeddings", None)
    if max_pos is not None and d.max_tokens > max_pos:
        raise InputError(
            f"prune.models.{model}.distill.max_tokens: {d.max_tokens} exceeds the model's "
            f"max_position_embeddings ({max_pos}); lower it"
        )
    if len(sentences) < d.heldout_sentences + d.batch_size:
        raise InputError(
            f"{text}: {len(sentences)} unique sentences; prune.models.{model}.distill needs at least "
            f"heldout_sentences + batch_size = {d.heldout_sentences + d.batch_size}"
        )


def prune_and_distill(teacher, student, tokenizer, sentences: list[str], settings: PruneSettings) -> tuple[list, dict]:
    """Steps 1-4 of the module docstring on `student` (a copy of `teacher`), in place: the plan and a report."""
    import torch

    from tasks.export_onnx import sentence_embedder

    d = settings.distill
    pad_id = tokenizer.pad_token_id
    order = np.random.default_rng(settings.seed).permutation(len(sentences))
    heldout = encode(tokenizer, [sentences[i] for i in order[: d.heldout_sentences]], d.max_tokens)
    train = encode(tokenizer, [sentences[i] for i in order[d.heldout_sentences :]], d.max_tokens)

    t0 = time.perf_counter()
    if settings.importance == "l1":
        head_scores, ffn_scores = l1_importance(student)
    else:
        sample = train[: settings.importance_sentences]
        batches = (collate([sample[i] for i in idx], pad_id) for idx in _by_length(sample, d.batch_size))
        head_scores, ffn_scores = activation_importance(student, batches)
    plan = select(settings, head_scores, ffn_scores)
    apply_plan(student, plan)
    importance_s = time.perf_counter() - t0

    teacher_emb, student_emb = sentence_embedder(teacher), sentence_embedder(student)
    t0 = time.perf_counter()
    held_teacher = embed_all(teacher_emb, heldout, pad_id, d.batch_size)
    before = _cosine_summary(embed_all(student_emb, heldout, pad_id, d.batch_size), held_teacher)
    targets = embed_all(teacher_emb, train, pad_id, d.batch_size) if d.steps else None
    teacher_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = distill(student_emb, train, pad_id, targets, d, settings.seed) if d.steps else []
    distill_s = time.perf_counter() - t0
    after = _cosine_summary(embed_all(student_emb, heldout, pad_id, d.batch_size), held_teacher)
    if not all(math.isfinite(x) for x in losses) or not math.isfinite(after["mean"]):
        raise StageError("prune: distillation diverged (non-finite loss); lower distill.lr")
    curve = _curve(losses)
    report = {
        "distill": {
            "train_sentences": len(train),
            "heldout_sentences": len(heldout),
            "epochs": d.steps * d.batch_size / len(train),
            "loss_first": losses[0] if losses else None,
            "loss_last_window": curve[-1]["loss"] if curve else None,
            "loss_curve": curve,
            "importance_s": importance_s,
            "teacher_embeddings_s": teacher_s,
            "distill_s": distill_s,
            "threads": torch.get_num_threads(),
        },
        "heldout_cosine_to_dense": {"before_distill": before, "after_distill": after},
    }
    return plan, report


def run(*, model_dir: Path, text: Path | None, model: str, params: PruneParams, out_dir: Path, key: str) -> dict:
    import copy

    from tasks.export_onnx import load_encoder

    settings = params.model(model)
    started = time.perf_counter()
    if read_spec(Path(model_dir)) is not None:
        raise InputError(f"{model_dir}: already pruned ({PRUNE_JSON}); prune the fetched model folder")
    tokenizer, teacher = load_encoder(Path(model_dir), "eager")
    base_shapes, base_params = layer_shapes(teacher), count_params(teacher)
    student = copy.deepcopy(teacher)

    payload: dict = {"model": model, "settings": settings.model_dump(mode="json")}
    if settings.prunes:
        if text is None:
            raise InputError(f"prune.models.{model}: prunes, so it needs the distillation text (text_pool.csv)")
        sentences = read_text(Path(text))
        _check_text(sentences, Path(text), model, teacher, settings.distill)
        plan, report = prune_and_distill(teacher, student, tokenizer, sentences, settings)
        payload.update(report)
    else:
        plan = [{"heads": list(range(b["heads"])), "ffn_channels": list(range(b["ffn"]))} for b in base_shapes]
        apply_plan(student, plan)  # a no-op slice: the same code path as pruning, checked bit-exact by tests
        payload["distill"] = {"skipped": "nothing pruned"}

    payload["layers"] = [
        {
            "heads_kept": keep["heads"],
            "heads": s["heads"],
            "heads_removed": b["heads"] - s["heads"],
            "ffn": s["ffn"],
            "ffn_removed": b["ffn"] - s["ffn"],
        }
        for keep, s, b in zip(plan, layer_shapes(student), base_shapes)
    ]
    payload["params_before"], payload["params_after"] = base_params, count_params(student)
    payload["params_ratio"] = payload["params_after"]["encoder_layers"] / base_params["encoder_layers"]

    with atomic_output_dir(out_dir) as scratch:
        save_pruned(student, tokenizer, plan, scratch / MODEL_SUBDIR)
        payload["time_s"] = time.perf_counter() - started
        write_stamp(scratch, key, payload)
    return payload
