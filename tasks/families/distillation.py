"""Recovery of a pruned model by knowledge distillation from the unpruned one on unlabelled samples.

The student (pruned) learns to reproduce the teacher's (dense) exported output on the samples with the
family's loss (an embedder: 1 - cosine, optionally + MSE; a classifier: KL divergence of the class
distributions). AdamW with linear warm-up and decay, gradient clipping, no dropout (the target is
deterministic and the text small). Batches hold samples of similar length (little padding) but consecutive
steps see unrelated ones (`batch_plan`). The same seed, samples and thread count give bit-identical weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import Field, model_validator

from tasks.core.params import StrictParams

LOSS_CURVE_POINTS = 20
# Batches sorted by length together in distillation (see batch_plan); more = less padding, less randomness.
BUCKET_BATCHES = 50
Collate = Callable[[list], dict]
Loss = Callable[..., object]


class DistillSettings(StrictParams):
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
    heldout_sentences: int = Field(500, ge=1, description="samples (text rows, images) kept out of training for the "
                                   "agreement check")
    temperature: float = Field(1.0, gt=0, le=20, description="classifiers: the KL divergence compares the class "
                               "distributions of logits / temperature (scaled by temperature^2)")
    augment_views: int = Field(0, ge=0, le=64, description="images: seeded random views (crop of 35-100 % of the area, "
                               "horizontal flip) of every training image added to it, the teacher's outputs on each")
    image_size: int | None = Field(None, ge=8, description="images: distil at this size (null: the first of seq_lens)")
    recalibrate_bn: bool = Field(True, description="images: after slicing, re-estimate every BatchNorm's running "
                                 "statistics on the training images (and views) before distilling; a pruned "
                                 "layer's inputs no longer have the dense statistics")
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


def by_length(ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length (little padding), in length order."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def embed_all(embedder, ids: list[list[int]], collate: Collate, batch_size: int):
    """Outputs [N, ...] in the order of `ids`, computed in length-sorted batches."""
    import torch

    out = None
    with torch.no_grad():
        for idx in by_length(ids, batch_size):
            emb = embedder(**collate([ids[i] for i in idx]))
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


def distill(
    student, ids: list[list[int]], collate: Collate, targets, loss_fn: Loss, settings: DistillSettings, seed: int,
    frozen=(),
) -> list[float]:
    """Train `student` (the export module of the pruned model) towards `targets` (the teacher's outputs for
    `ids`); per-step losses. `frozen`: parameters left as they are (e.g. the embedding tables)."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    plan = batch_plan(np.array([len(x) for x in ids]), settings.batch_size, settings.steps, np.random.default_rng(seed))
    for weight in frozen:
        weight.requires_grad_(False)
    trained = [w for w in student.parameters() if w.requires_grad]
    warmup = max(1, int(settings.steps * settings.warmup_ratio))
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (settings.steps - s) / max(1, settings.steps - warmup)))
    )
    student.eval()  # no dropout: the target is deterministic and the text small
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
                loss = loss_fn(student(**collate([ids[i] for i in idx])), targets[torch.from_numpy(idx)])
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


def kl_loss(temperature: float) -> Loss:
    """KL divergence of the student's class distribution from the teacher's, both softened by `temperature`,
    scaled by temperature^2 (Hinton et al. 2015: the gradients keep their size)."""
    import torch

    def loss(student, teacher):
        if temperature == 1.0:  # as before temperatures existed, bit for bit
            return torch.nn.functional.kl_div(torch.log_softmax(student, dim=1), torch.log_softmax(teacher, dim=1),
                                              log_target=True, reduction="batchmean")
        return torch.nn.functional.kl_div(
            torch.log_softmax(student / temperature, dim=1), torch.log_softmax(teacher / temperature, dim=1),
            log_target=True, reduction="batchmean") * temperature**2

    return loss


def curve(losses: list[float]) -> list[dict]:
    """Mean loss over LOSS_CURVE_POINTS equal windows of steps."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(LOSS_CURVE_POINTS, len(losses)) + 1).astype(int)
    return [{"step": int(b), "loss": float(np.mean(losses[a:b]))} for a, b in zip(edges[:-1], edges[1:])]
