"""Structured pruning of transformer encoders: attention heads and FFN channels, for every architecture in
`LAYOUTS` (where each one keeps its per-layer linears and head bookkeeping).

1. Importance, per head and per FFN channel of every layer:
   `l1`: the L1 norm of the unit's weights: a head's rows of query/key/value plus its columns of the
   attention output projection; a channel's row of the FFN input projection plus its column of the FFN
   output projection.
   `activation`: the mean L1 norm (over real tokens of sample texts) of the unit's contribution to the
   residual stream: head h adds context_h @ W_o[:, h]^T, channel j adds act_j * W_out[:, j].
2. Selection (`scope`): `layer` removes round(ratio * n) units of every layer (the same shapes in every
   layer); `global` ranks all layers' units together after dividing each layer's scores by their L2 norm
   (Michel et al. 2019: raw norms differ in scale between layers) and removes the lowest round(ratio *
   total). Every layer keeps at least one head and `ffn_multiple` channels; FFN widths are rounded up to a
   multiple of `ffn_multiple` (GEMM kernels prefer aligned widths).
3. Slicing: query/key/value lose the rows of removed heads, the attention output projection the matching
   input columns, the FFN input projection rows and the FFN output projection columns; the attention
   module's head count (and all-head size) is set to the kept count so eager attention reshapes to it.
   Kept units keep their order.

A pruned model is saved as an HF folder plus `prune.json` (per layer: the original indices of the kept
heads and the kept FFN width); `load_pruned` rebuilds the architecture from config.json, narrows each
layer to those shapes and loads the weights strictly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.errors import InputError

PRUNE_JSON = "prune.json"
WEIGHTS = "model.safetensors"
PRUNE_FORMAT = 1


@dataclass(frozen=True)
class EncoderLayout:
    """Where an architecture keeps what pruning slices (dotted paths; layers relative to the base model,
    the rest relative to one layer)."""

    layers: str
    attention: str
    query: str
    key: str
    value: str
    attention_output: str
    ffn_in: str
    ffn_out: str
    heads_attr: str
    head_size_attr: str = "attention_head_size"
    all_head_size_attr: str | None = "all_head_size"
    no_head_pruning: str | None = None
    """Why this architecture's heads cannot be pruned (said when a config asks for it); None when they can."""


_BERT = EncoderLayout(
    layers="encoder.layer", attention="attention.self", query="attention.self.query", key="attention.self.key",
    value="attention.self.value", attention_output="attention.output.dense", ffn_in="intermediate.dense",
    ffn_out="output.dense", heads_attr="num_attention_heads",
)
LAYOUTS: dict[str, EncoderLayout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "distilbert": EncoderLayout(
        layers="transformer.layer", attention="attention", query="attention.q_lin", key="attention.k_lin",
        value="attention.v_lin", attention_output="attention.out_lin", ffn_in="ffn.lin1", ffn_out="ffn.lin2",
        heads_attr="n_heads", all_head_size_attr=None,
    ),
    "mpnet": EncoderLayout(
        layers="encoder.layer", attention="attention.attn", query="attention.attn.q", key="attention.attn.k",
        value="attention.attn.v", attention_output="attention.attn.o", ffn_in="intermediate.dense",
        ffn_out="output.dense", heads_attr="num_attention_heads",
        no_head_pruning="MPNet adds one relative-position bias with every head to every layer, so a layer cannot "
        "lose heads alone; set head_ratio: 0 (FFN channels can be pruned)",
    ),
}


def layout_for(config: Any) -> EncoderLayout:
    try:
        return LAYOUTS[config.model_type]
    except KeyError:
        raise InputError(
            f"model_type {config.model_type!r} is not prunable here (known: {', '.join(LAYOUTS)}); "
            "remove its entry with head_ratio/ffn_ratio from prune.models or add its layout to "
            "tasks/families/encoder_pruning.py"
        ) from None


def _get(module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def _set(module, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for name in parents:
        module = getattr(module, name)
    setattr(module, last, value)


def base_model(model):
    """The encoder itself (a task head such as a classifier sits on top of it)."""
    return getattr(model, "base_model", model)


def layers(model, layout: EncoderLayout) -> list:
    try:
        found = list(_get(base_model(model), layout.layers))
        for layer in found:
            for path in (layout.query, layout.key, layout.value, layout.attention_output, layout.ffn_in, layout.ffn_out):
                _get(layer, path)
    except AttributeError as exc:
        raise InputError(
            f"model_type {model.config.model_type!r}: no {exc.args[0].split()[-1]} where its pruning layout "
            "expects it; this transformers version changed the architecture"
        ) from exc
    return found


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



def prune_layer(layer, layout: EncoderLayout, heads: list[int], ffn_channels: list[int]) -> None:
    """Keep only `heads` (original head indices) and `ffn_channels` of one encoder layer, in place."""
    import torch

    attn = _get(layer, layout.attention)
    d = getattr(attn, layout.head_size_attr)
    rows = torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long)
    for path in (layout.query, layout.key, layout.value):
        _set(layer, path, _sliced(_get(layer, path), rows, 0))
    _set(layer, layout.attention_output, _sliced(_get(layer, layout.attention_output), rows, 1))
    setattr(attn, layout.heads_attr, len(heads))
    if layout.all_head_size_attr:
        setattr(attn, layout.all_head_size_attr, len(heads) * d)

    channels = torch.tensor(ffn_channels, dtype=torch.long)
    _set(layer, layout.ffn_in, _sliced(_get(layer, layout.ffn_in), channels, 0))
    _set(layer, layout.ffn_out, _sliced(_get(layer, layout.ffn_out), channels, 1))


def layer_shapes(model, layout: EncoderLayout) -> list[dict]:
    return [
        {"heads": int(getattr(_get(layer, layout.attention), layout.heads_attr)),
         "ffn": int(_get(layer, layout.ffn_in).out_features)}
        for layer in layers(model, layout)
    ]


def count_params(model, layout: EncoderLayout) -> dict[str, int]:
    container = _get(base_model(model), layout.layers.rsplit(".", 1)[0])
    encoder = sum(p.numel() for p in container.parameters())
    return {"total": int(sum(p.numel() for p in model.parameters())), "encoder_layers": int(encoder)}


# --------------------------------------------------------------------------- importance


def _head_view(layer, layout: EncoderLayout):
    """Per-head weights: q/k/v rows [H, d, hidden] and output-projection columns [hidden, H, d]."""
    attn = _get(layer, layout.attention)
    heads, d = getattr(attn, layout.heads_attr), getattr(attn, layout.head_size_attr)
    qkv = [_get(layer, p).weight.detach().reshape(heads, d, -1) for p in (layout.query, layout.key, layout.value)]
    out = _get(layer, layout.attention_output).weight.detach().reshape(-1, heads, d)
    return qkv, out


def l1_importance(model, layout: EncoderLayout) -> tuple[list, list]:
    """Per layer: head scores [H] and FFN channel scores [I] from weight L1 norms."""
    heads, ffn = [], []
    for layer in layers(model, layout):
        qkv, out = _head_view(layer, layout)
        heads.append(sum(w.abs().sum(dim=(1, 2)) for w in qkv) + out.abs().sum(dim=(0, 2)))
        w_in = _get(layer, layout.ffn_in).weight.detach()
        w_out = _get(layer, layout.ffn_out).weight.detach()
        ffn.append(w_in.abs().sum(dim=1) + w_out.abs().sum(dim=0))
    return heads, ffn


def activation_importance(model, layout: EncoderLayout, batches) -> tuple[list, list]:
    """Per layer: mean L1 norm of each head's / FFN channel's contribution to the residual stream."""
    import torch

    found = layers(model, layout)
    heads = [torch.zeros(getattr(_get(layer, layout.attention), layout.heads_attr), dtype=torch.float64)
             for layer in found]
    ffn = [torch.zeros(_get(layer, layout.ffn_in).out_features, dtype=torch.float64) for layer in found]
    state = {"mask": None, "tokens": 0}

    def head_hook(i):
        def hook(module, args):
            ctx = args[0][state["mask"]]  # [real tokens, H * d]
            _, out = _head_view(found[i], layout)
            ctx = ctx.reshape(ctx.shape[0], out.shape[1], out.shape[2])
            heads[i] += torch.einsum("nhd,ohd->nho", ctx, out).abs().sum(dim=(0, 2)).double()

        return hook

    def ffn_hook(i):
        def hook(module, args):
            act = args[0][state["mask"]]  # [real tokens, I]
            ffn[i] += (act.abs().sum(dim=0) * module.weight.detach().abs().sum(dim=0)).double()

        return hook

    handles = []
    for i, layer in enumerate(found):
        handles.append(_get(layer, layout.attention_output).register_forward_pre_hook(head_hook(i)))
        handles.append(_get(layer, layout.ffn_out).register_forward_pre_hook(ffn_hook(i)))
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


def select(settings, head_scores: list, ffn_scores: list) -> list[dict]:
    """Per layer: kept heads and FFN channels (original indices)."""
    n_heads = keep_counts(head_scores, settings.head_ratio, settings.scope, minimum=1)
    n_ffn = keep_counts(
        ffn_scores, settings.ffn_ratio, settings.scope, minimum=settings.ffn_multiple, multiple=settings.ffn_multiple
    )
    return [
        {"heads": top_units(h, nh), "ffn_channels": top_units(f, nf)}
        for h, f, nh, nf in zip(head_scores, ffn_scores, n_heads, n_ffn)
    ]



def apply_plan(model, layout: EncoderLayout, plan: list[dict]) -> None:
    for layer, keep in zip(layers(model, layout), plan):
        prune_layer(layer, layout, keep["heads"], keep["ffn_channels"])


# --------------------------------------------------------------------------- saving and loading


def _prune_spec(model, layout: EncoderLayout, plan: list[dict], base: dict) -> dict:
    attn = _get(layers(model, layout)[0], layout.attention)
    return {
        "format": PRUNE_FORMAT,
        "head_size": int(getattr(attn, layout.head_size_attr)),
        "base_heads": int(base["heads"]),
        "base_intermediate_size": int(base["ffn"]),
        "layers": [{"heads": keep["heads"], "intermediate_size": len(keep["ffn_channels"])} for keep in plan],
    }


def save_pruned(model, tokenizer, layout: EncoderLayout, plan: list[dict], base: dict, folder: Path) -> None:
    """The pruned model as an HF folder plus `prune.json` (the dense config: HF has no per-layer sizes);
    `base`: the unpruned layer shape (`layer_shapes` of the source model, first layer)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    spec = _prune_spec(model, layout, plan, base)
    (folder / PRUNE_JSON).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


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



def load_pruned(model_dir: Path, auto_class, attn_implementation: str):
    """The model of a pruned folder: its architecture from config.json, narrowed per prune.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    model = auto_class.from_config(AutoConfig.from_pretrained(model_dir), attn_implementation=attn_implementation)
    layout = layout_for(model.config)
    found = layers(model, layout)
    if len(spec["layers"]) != len(found):
        raise InputError(
            f"{model_dir / PRUNE_JSON}: {len(spec['layers'])} layers, config.json has {len(found)}; re-run the prune stage"
        )
    # The freshly initialised weights only carry the shapes; the checkpoint overwrites every one.
    for layer, shape in zip(found, spec["layers"]):
        prune_layer(layer, layout, list(range(len(shape["heads"]))), list(range(int(shape["intermediate_size"]))))
    try:
        model.load_state_dict(load_file(model_dir / WEIGHTS), strict=True)
    except (OSError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise InputError(f"{model_dir / WEIGHTS}: does not match {PRUNE_JSON} ({first}); re-run the prune stage") from exc
    return model.eval()
