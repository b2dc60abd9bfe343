"""Structured output-channel pruning of convolutional networks (image classifiers), by L1 norm.

1. Dependencies: torch-pruning's DepGraph traces the model once and splits its channels into groups that
   must lose the same channels together: a convolution's output channels with the BatchNorm after it, the
   depthwise convolution that follows (its channels and groups) and the input channels of the next
   convolution or linear layer. Every group is rooted at a convolution (`Conv2d`); no linear layer's outputs
   are pruned, so the classifier keeps its classes.
2. Prunable groups: a group whose channels several convolutions write (a residual add: every block of a
   stage adds into the same channels; a concatenation) is the residual stream. It is left whole unless
   `residual` is set (then the group drops the same channels in every block). In an inverted-residual /
   MBConv block the expanded inner channels (expand 1x1 -> depthwise -> project 1x1) are a group of their
   own, so pruning them keeps the residual shapes intact. A group with a layer whose channels this module
   cannot slice (LayerNorm, grouped but not depthwise convolution...) is left whole and reported.
3. Importance: the group L1 norm of each channel (torch-pruning's GroupMagnitudeImportance, p=1, mean
   over the group's convolution, BatchNorm and linear weights of that channel, no normalisation).
4. Selection: every prunable group removes round(ratio * n) channels (scope `layer`), or the groups' scores
   are ranked together after dividing each by its L2 norm (scope `global`); kept counts are rounded up to a
   multiple of `multiple` (CPU convolution kernels block channels by 8 or 16) and at least `multiple`.
5. Slicing (ours, not torch-pruning's, so a saved model reloads without it): each convolution, BatchNorm and
   linear layer keeps the recorded original indices of its output and input channels, in order.
6. BatchNorm recalibration (the stage's `distill.recalibrate_bn`): a layer that lost input channels no longer
   produces the dense statistics its BatchNorm holds; re-estimating them on the training images recovers most
   of what slicing loses before any distillation.

A pruned model is saved with the dense model's `config.json`, its pruned weights and `prune.json`: per
layer (dotted module name) the original indices of the kept output (`out`) and input (`in`) channels.
`apply_plan` on the dense architecture rebuilds the pruned shapes, then the weights load strictly: no pickled
module is ever read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tasks.core.errors import InputError
from tasks.families.encoder_pruning import keep_counts

PRUNE_JSON = "prune.json"
WEIGHTS = "model.safetensors"
KIND = "conv_channels"
PRUNE_FORMAT = 1


@dataclass
class ChannelGroup:
    """One set of channels that are pruned together."""

    root: str
    """The convolution whose output channels the group is rooted at."""
    size: int
    members: list[tuple[str, str, list[int]]]
    """(module name, "out" or "in", that module's channel index for each root channel)."""
    residual: bool
    """Written by several convolutions (a residual add or a concatenation)."""
    unsupported: str | None = None
    """Why the group cannot be sliced here (None when it can)."""
    scores: object = None
    """L1 importance per root channel (torch tensor)."""


@dataclass(frozen=True)
class ChannelLayout:
    """What the image family prunes: convolution output channels (the stage's handle on this module)."""

    kind: str = KIND
    notes: list = field(default_factory=list)


def _module_names(model) -> dict:
    return {m: name for name, m in model.named_modules()}


def _depthwise(conv) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _why_not(module) -> str | None:
    import torch

    if isinstance(module, torch.nn.Conv2d):
        if module.groups > 1 and not _depthwise(module):
            return f"grouped convolution ({module.groups} groups, not depthwise)"
        return None
    if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.Linear)):
        return None
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        return f"{type(module).__name__} holds per-channel weights this module does not slice"
    return None


def analyse(wrapper, model, example) -> list[ChannelGroup]:
    """The channel groups of `model` (traced through `wrapper`, the module whose forward takes `example`), each
    with its L1 importance; `model`'s module names name the layers."""
    import torch
    import torch_pruning as tp

    wrapper.eval()
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    graph = tp.DependencyGraph().build_dependency(wrapper, example_inputs=example)
    names = _module_names(model)
    importance = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None, group_reduction="mean")
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[torch.nn.Conv2d]):
        root_module = group[0].dep.target.module
        size = len(group[0].idxs)
        members, producers, unsupported = [], 0, None
        for item in group.items:
            dep, module = item.dep, item.dep.target.module
            if not isinstance(module, torch.nn.Module) or module not in names:
                continue  # a functional op (activation, add, padding, reshape): nothing to slice
            why = _why_not(module)
            if not any(True for _ in module.parameters(recurse=False)) and why is None:
                continue
            unsupported = unsupported or (f"{names[module]}: {why}" if why else None)
            out = graph.is_out_channel_pruning_fn(dep.handler)
            if out and isinstance(module, torch.nn.Conv2d) and not _depthwise(module):
                producers += 1
            local = [0] * size
            for idx, root in zip(item.idxs, item.root_idxs):
                local[int(root)] = int(idx)
            members.append((names[module], "out" if out else "in", local))
        if not members:
            continue
        with torch.no_grad():
            scores = importance(group)
        groups.append(ChannelGroup(names.get(root_module, "?"), size, members, producers > 1, unsupported,
                                   None if scores is None else scores.detach().double()))
    return groups


def prunable(groups: list[ChannelGroup], residual: bool) -> list[ChannelGroup]:
    return [g for g in groups if g.unsupported is None and (residual or not g.residual) and g.scores is not None]


def _channels(module, side: str) -> int:
    import torch

    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels if side == "out" else module.in_channels
    if isinstance(module, torch.nn.BatchNorm2d):
        return module.num_features
    return module.out_features if side == "out" else module.in_features


def select(model, groups: list[ChannelGroup], ratio: float, scope: str, multiple: int) -> dict:
    """The plan: {module name: {"out": kept indices, "in": kept indices}} for every sliced layer (original
    indices, in order); layers that keep everything are listed too when a group touches them."""
    import torch

    modules = dict(model.named_modules())
    # The encoders' count rule (round(ratio * n) per group, or ranked globally), at least `multiple` kept.
    counts = keep_counts([g.scores for g in groups], ratio, scope, minimum=multiple, multiple=multiple)
    removed: dict[tuple[str, str], set[int]] = {}
    for group, count in zip(groups, counts):
        order = torch.argsort(-group.scores, stable=True)
        gone = {int(i) for i in order[count:]}
        for name, side, local in group.members:
            removed.setdefault((name, side), set()).update(local[i] for i in gone)
    plan: dict[str, dict] = {}
    for (name, side), gone in sorted(removed.items()):
        plan.setdefault(name, {})[side] = [i for i in range(_channels(modules[name], side)) if i not in gone]
    return plan


def _take(tensor, index, dim: int):
    return tensor.detach().index_select(dim, index).clone()


def _slice(module, out: list[int] | None, inp: list[int] | None) -> None:
    import torch

    def param(name: str, index, dim: int) -> None:
        value = getattr(module, name)
        if value is not None:
            setattr(module, name, torch.nn.Parameter(_take(value, index, dim), requires_grad=value.requires_grad))

    def as_index(kept):
        return torch.tensor(kept, dtype=torch.long)

    def weight_axes(out_attr: str, in_attr: str) -> None:
        """A convolution's or linear layer's weight: outputs on axis 0 (and the bias), inputs on axis 1."""
        if out is not None:
            param("weight", as_index(out), 0)
            param("bias", as_index(out), 0)
            setattr(module, out_attr, len(out))
        if inp is not None:
            param("weight", as_index(inp), 1)
            setattr(module, in_attr, len(inp))

    if isinstance(module, torch.nn.Conv2d):
        if _depthwise(module):
            kept = out if out is not None else inp
            if out is not None and inp is not None and out != inp:
                raise InputError("prune.json: a depthwise convolution keeps other input than output channels; "
                                 "re-run the prune stage")
            index = as_index(kept)
            param("weight", index, 0)
            param("bias", index, 0)
            module.in_channels = module.out_channels = module.groups = len(kept)
            return
        weight_axes("out_channels", "in_channels")
    elif isinstance(module, torch.nn.BatchNorm2d):
        kept = out if out is not None else inp
        index = as_index(kept)
        param("weight", index, 0)
        param("bias", index, 0)
        module.running_mean = _take(module.running_mean, index, 0)
        module.running_var = _take(module.running_var, index, 0)
        module.num_features = len(kept)
    elif isinstance(module, torch.nn.Linear):
        weight_axes("out_features", "in_features")
    else:
        raise InputError(f"prune.json: cannot slice a {type(module).__name__}; re-run the prune stage")


def apply_plan(model, plan: dict) -> None:
    """Slice every layer of `model` (dense shapes) to the plan's kept channels, in place."""
    modules = dict(model.named_modules())
    missing = sorted(set(plan) - set(modules))
    if missing:
        raise InputError(f"prune.json: no layer {missing[0]!r} in the model; re-run the prune stage")
    for name, sides in plan.items():
        _slice(modules[name], sides.get("out"), sides.get("in"))


def recalibrate_bn(module, batches) -> None:
    """Every BatchNorm's running mean and variance re-estimated as the plain average over `batches` (dicts of
    the module's inputs), weights unchanged; the module is left in eval mode."""
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
    module.train()
    try:
        with torch.no_grad():
            for batch in batches:
                module(**batch)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        module.eval()


def shapes(model) -> dict[str, list[int]]:
    """[out, in] channels of every convolution (per-layer shapes for stage.json)."""
    import torch

    return {name: [m.out_channels, m.in_channels] for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def count(wrapper, model, example) -> dict[str, int]:
    """Parameters and multiply-accumulates of one image (convolutions and linear layers) at `example`'s size."""
    import torch

    macs = [0]

    def hook(module, args, output):
        per_out = output[0].numel()
        if isinstance(module, torch.nn.Conv2d):
            macs[0] += per_out * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        else:
            macs[0] += per_out * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            wrapper(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return {"params": int(sum(p.numel() for p in model.parameters())), "macs": int(macs[0])}


def spec(plan: dict, settings: dict) -> dict:
    return {"format": PRUNE_FORMAT, "kind": KIND, "settings": settings, "layers": plan}


def save(model, plan: dict, settings: dict, folder: Path) -> None:
    """The pruned weights (safetensors) and prune.json into `folder` (the caller adds config and preprocessing)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / PRUNE_JSON).write_text(json.dumps(spec(plan, settings), indent=1) + "\n", encoding="utf-8")


def read_spec(model_dir: Path) -> dict | None:
    """The plan of a pruned folder's `prune.json`, validated; None for a dense folder."""
    path = Path(model_dir) / PRUNE_JSON
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        ok = raw["format"] == PRUNE_FORMAT and raw["kind"] == KIND and all(
            isinstance(sides, dict) and set(sides) <= {"out", "in"}
            and all(isinstance(k, list) and k and all(isinstance(i, int) for i in k) for k in sides.values())
            for sides in raw["layers"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a channel-pruning spec ({exc.__class__.__name__}); re-run the prune stage") from exc
    if not ok:
        raise InputError(f"{path}: unsupported format or a layer that keeps no channel; re-run the prune stage")
    return raw["layers"]
