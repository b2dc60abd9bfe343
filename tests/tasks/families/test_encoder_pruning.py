"""Encoder pruning mechanics (tasks.families.encoder_pruning): the right heads and FFN channels, removed exactly."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import SENTENCE_ENCODER
from helpers import sentences

from tasks.families.encoder_pruning import (
    activation_importance,
    keep_counts,
    l1_importance,
    layout_for,
    prune_layer,
    select,
)
from tasks.families.sentence_encoder import FAMILY
from tasks.stages.prune import PruneSettings

# Tiny BERT: hidden 32, 2 layers of 2 heads (head size 16), FFN 64, 64 positions.

pytestmark = pytest.mark.usefixtures("one_thread")



def _scale_head(layer, head: int, factor: float) -> None:
    attn, d = layer.attention.self, layer.attention.self.attention_head_size
    rows = slice(head * d, (head + 1) * d)
    with torch.no_grad():
        for lin in (attn.query, attn.key, attn.value):
            lin.weight[rows] *= factor
        layer.attention.output.dense.weight[:, rows] *= factor


def test_removing_dead_units_leaves_the_output_unchanged(tiny_bert):
    """Slicing is exact: units that write nothing (zero output weights) can go without changing a bit
    of meaning; a wrong row/column would change the output."""
    loaded = FAMILY.load(tiny_bert, SENTENCE_ENCODER, "eager")
    tokenizer, model, layout = loaded.preprocessor, loaded.model, layout_for(loaded.config)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.output.dense.weight[:, 16:] = 0  # head 1 writes nothing
            layer.output.dense.weight[:, ::2] = 0  # even FFN channels write nothing
    pruned = copy.deepcopy(model)
    for layer in pruned.encoder.layer:
        prune_layer(layer, layout, heads=[0], ffn_channels=list(range(1, 64, 2)))
    batch = FAMILY.collate(FAMILY.encode(tokenizer, sentences(6, seed=2, end="."), 32), tokenizer.pad_token_id)
    ref_embedder, _ = FAMILY.export_module(loaded, SENTENCE_ENCODER)
    pruned_embedder, _ = FAMILY.export_module(replace(loaded, model=pruned), SENTENCE_ENCODER)
    with torch.no_grad():
        ref, got = ref_embedder(**batch), pruned_embedder(**batch)
    assert torch.allclose(ref, got, atol=1e-6)
    assert pruned.encoder.layer[1].intermediate.dense.weight.shape == (32, 32)


@pytest.mark.parametrize("importance", ["l1", "activation"])
def test_importance_picks_the_weakest_heads_and_channels(tiny_bert, importance):
    loaded = FAMILY.load(tiny_bert, SENTENCE_ENCODER, "eager")
    tokenizer, model, layout = loaded.preprocessor, loaded.model, layout_for(loaded.config)
    _scale_head(model.encoder.layer[0], 1, 0.05)
    _scale_head(model.encoder.layer[1], 0, 0.05)
    weak = list(range(5, 21))
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight[weak] *= 0.05
        model.encoder.layer[0].output.dense.weight[:, weak] *= 0.05
    if importance == "l1":
        heads, ffn = l1_importance(model, layout)
    else:
        ids = FAMILY.encode(tokenizer, sentences(32, seed=3, end="."), 32)
        batches = [FAMILY.collate(ids[i : i + 8], tokenizer.pad_token_id) for i in range(0, 32, 8)]
        heads, ffn = activation_importance(model, layout, batches)
    plan = select(PruneSettings(head_ratio=0.5, ffn_ratio=0.25, ffn_multiple=1), heads, ffn)
    assert [keep["heads"] for keep in plan] == [[0], [1]]
    assert plan[0]["ffn_channels"] == [c for c in range(64) if c not in weak]


def test_global_scope_takes_heads_where_they_are_weakest():
    strong, mixed = torch.tensor([1.0, 1.1]), torch.tensor([1.0, 0.05])
    assert keep_counts([mixed, strong], 0.25, "global", minimum=1) == [1, 2]
    assert keep_counts([mixed, strong], 0.25, "layer", minimum=1) == [1, 1]
    # Every layer keeps its minimum, and FFN widths round up to the multiple.
    assert keep_counts([mixed, strong], 0.9, "layer", minimum=1) == [1, 1]
    assert keep_counts([torch.ones(64)], 0.3, "layer", minimum=16, multiple=16) == [48]
