"""prune: heads and FFN channels really removed, the right ones, exactly; distillation recovers; exports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tasks.config import ExportOnnxParams
from tasks.errors import InputError
from tasks.export_onnx import load_encoder, sentence_embedder, tokenize
from tasks.export_onnx import run as export_onnx
from tasks.prune import (
    DistillSettings,
    PruneParams,
    PruneSettings,
    collate,
    encode,
    keep_counts,
    l1_importance,
    activation_importance,
    prune_layer,
    run,
    select,
)
from tiny_models import WORDS, make_tiny_encoder

# Tiny BERT: hidden 32, 2 layers of 2 heads (head size 16), FFN 64, 64 positions.
FAST = DistillSettings(steps=0, batch_size=8, max_tokens=32, heldout_sentences=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all overhead: two OpenMP threads on a busy 2-core machine spin-wait (~20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text_pool.csv"
    pd.DataFrame({"sentence": _sentences(200, seed=0), "source": "x"}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def spread_bert(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT with 10x larger layer weights: a random init at std 0.02 maps every sentence to
    nearly the same embedding (cosine ~0.9999 between any two), too flat to show distillation work."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_bert)
    with torch.no_grad():
        for name, weight in model.encoder.named_parameters():
            if name.endswith("dense.weight") or name.endswith(("query.weight", "key.weight", "value.weight")):
                weight.mul_(10)
    folder = tmp_path_factory.mktemp("spread") / "bert"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def _params(**settings) -> PruneParams:
    return PruneParams(models={"dense": PruneSettings(), "p": PruneSettings(**{"distill": FAST, **settings})})


def _embed(folder: Path, sentences: list[str]) -> np.ndarray:
    tokenizer, model = load_encoder(folder, "eager")
    feeds = tokenize(tokenizer, sentences, 16)
    with torch.no_grad():
        return sentence_embedder(model)(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()


def _scale_head(layer, head: int, factor: float) -> None:
    attn, d = layer.attention.self, layer.attention.self.attention_head_size
    rows = slice(head * d, (head + 1) * d)
    with torch.no_grad():
        for lin in (attn.query, attn.key, attn.value):
            lin.weight[rows] *= factor
        layer.attention.output.dense.weight[:, rows] *= factor


def test_defaults_dense_is_unpruned_and_pruned_prunes():
    params = PruneParams()
    assert set(params.models) == {"dense", "pruned"}
    assert not params.model("dense").prunes and params.model("pruned").prunes
    with pytest.raises(InputError) as err:
        params.model("nope")
    assert "unknown model 'nope'" in str(err.value) and "\n" not in str(err.value)


def test_ratio_zero_is_the_fetched_model_bit_for_bit(tiny_bert, tmp_path):
    payload = run(model_dir=tiny_bert, text=None, model="dense", params=_params(), out_dir=tmp_path / "o", key="k")
    folder = tmp_path / "o" / "model"
    original, saved = load_file(tiny_bert / "model.safetensors"), load_file(folder / "model.safetensors")
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    spec = json.loads((folder / "prune.json").read_text())
    assert [layer["heads"] for layer in spec["layers"]] == [[0, 1], [0, 1]]
    assert payload["params_after"] == payload["params_before"] and payload["distill"] == {"skipped": "nothing pruned"}
    assert json.loads((tmp_path / "o" / "stage.json").read_text())["key"] == "k"
    sentences = _sentences(4, seed=1)
    assert np.array_equal(_embed(folder, sentences), _embed(tiny_bert, sentences))


def test_heads_and_ffn_channels_are_removed(tiny_bert, text, tmp_path):
    params = _params(head_ratio=0.5, ffn_ratio=0.5, ffn_multiple=8)
    payload = run(model_dir=tiny_bert, text=text, model="p", params=params, out_dir=tmp_path / "o", key="k")
    w = load_file(tmp_path / "o" / "model" / "model.safetensors")
    for i in range(2):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            assert w[p + f"attention.self.{name}.weight"].shape == (16, 32)  # one head of 16 left
            assert w[p + f"attention.self.{name}.bias"].shape == (16,)
        assert w[p + "attention.output.dense.weight"].shape == (32, 16)
        assert w[p + "intermediate.dense.weight"].shape == (32, 32)
        assert w[p + "output.dense.weight"].shape == (32, 32)
    assert [(x["heads"], x["ffn"]) for x in payload["layers"]] == [(1, 32), (1, 32)]
    assert payload["params_after"]["encoder_layers"] < 0.6 * payload["params_before"]["encoder_layers"]
    _, model = load_encoder(tmp_path / "o" / "model", "sdpa")
    assert model.encoder.layer[0].attention.self.num_attention_heads == 1


def test_removing_dead_units_leaves_the_output_unchanged(tiny_bert):
    """Slicing is exact: units that write nothing (zero output weights) can go without changing a bit
    of meaning; a wrong row/column would change the output."""
    tokenizer, model = load_encoder(tiny_bert, "eager")
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.output.dense.weight[:, 16:] = 0  # head 1 writes nothing
            layer.output.dense.weight[:, ::2] = 0  # even FFN channels write nothing
    pruned = copy.deepcopy(model)
    for layer in pruned.encoder.layer:
        prune_layer(layer, heads=[0], ffn_channels=list(range(1, 64, 2)))
    batch = collate(encode(tokenizer, _sentences(6, seed=2), 32), tokenizer.pad_token_id)
    with torch.no_grad():
        ref, got = sentence_embedder(model)(**batch), sentence_embedder(pruned)(**batch)
    assert torch.allclose(ref, got, atol=1e-6)
    assert pruned.encoder.layer[1].intermediate.dense.weight.shape == (32, 32)


@pytest.mark.parametrize("importance", ["l1", "activation"])
def test_importance_picks_the_weakest_heads_and_channels(tiny_bert, importance):
    tokenizer, model = load_encoder(tiny_bert, "eager")
    _scale_head(model.encoder.layer[0], 1, 0.05)
    _scale_head(model.encoder.layer[1], 0, 0.05)
    weak = list(range(5, 21))
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight[weak] *= 0.05
        model.encoder.layer[0].output.dense.weight[:, weak] *= 0.05
    if importance == "l1":
        heads, ffn = l1_importance(model)
    else:
        ids = encode(tokenizer, _sentences(32, seed=3), 32)
        batches = [collate(ids[i : i + 8], tokenizer.pad_token_id) for i in range(0, 32, 8)]
        heads, ffn = activation_importance(model, batches)
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


def test_distillation_recovers_and_is_deterministic(spread_bert, text, tmp_path):
    distill = DistillSettings(steps=30, lr=2e-3, batch_size=16, max_tokens=32, heldout_sentences=24, warmup_ratio=0)
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        params = _params(head_ratio=0.5, ffn_ratio=0.5, ffn_multiple=8, distill=distill, seed=seed)
        outs[name] = run(model_dir=spread_bert, text=text, model="p", params=params, out_dir=tmp_path / name, key="k")
    d, cos = outs["a"]["distill"], outs["a"]["heldout_cosine_to_dense"]
    assert d["loss_last_window"] < 0.5 * d["loss_first"]
    # Half the heads and channels gone: the embedding is far off (~0.5) until distillation pulls it back.
    assert cos["before_distill"]["mean"] < 0.8 and cos["after_distill"]["mean"] > 0.95
    weights = {n: (tmp_path / n / "model" / "model.safetensors").read_bytes() for n in outs}
    assert weights["a"] == weights["b"] and weights["a"] != weights["c"]
    assert len(d["loss_curve"]) == 20 and d["loss_curve"][-1]["step"] == 30


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_pruned_model_exports_and_onnx_matches_torch(tiny_bert, text, tmp_path, model_type):
    source = tiny_bert if model_type == "bert" else make_tiny_encoder(tmp_path / "roberta", "roberta")
    params = _params(head_ratio=0.5, ffn_ratio=0.25, importance="activation")
    run(model_dir=source, text=text, model="p", params=params, out_dir=tmp_path / "p", key="k")
    payload = export_onnx(tmp_path / "p" / "model", 16, ExportOnnxParams(), tmp_path / "onnx", key="k")
    assert payload["verify_max_abs_err"] < 1e-4 and payload["verify_min_cosine"] > 0.9999

    graph = onnx.load(tmp_path / "onnx" / "model.onnx").graph
    dims = {tuple(init.dims) for init in graph.initializer}
    assert (32, 16) in dims and (32, 48) in dims and (48, 32) in dims  # q/k/v, FFN in, FFN out (transposed)
    assert (32, 64) not in dims  # no dense-width FFN left
    sentences = _sentences(3, seed=4)
    tokenizer, _ = load_encoder(tmp_path / "p" / "model", "eager")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    torch_emb = _embed(tmp_path / "p" / "model", sentences)
    for i, feeds in enumerate(tokenize(tokenizer, [s], 16) for s in sentences):
        np.testing.assert_allclose(session.run(None, feeds)[0][0], torch_emb[i], atol=1e-5)


def _text_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.csv"
    if case == "good":
        pd.DataFrame({"sentence": _sentences(60, seed=5)}).to_csv(path, index=False)
    elif case == "column":
        pd.DataFrame({"text": _sentences(60, seed=5)}).to_csv(path, index=False)
    elif case == "few":
        pd.DataFrame({"sentence": _sentences(10, seed=5)}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("case", "settings", "expected"),
    [
        ("column", {}, "no column 'sentence'"),
        ("few", {}, "needs at least heldout_sentences + batch_size"),
        ("missing", {}, "cannot read the distillation text"),
        ("good", {"distill": FAST.model_copy(update={"max_tokens": 100})}, "exceeds the model's max_position"),
    ],
)
def test_bad_text_is_a_one_line_input_error(tiny_bert, tmp_path, case, settings, expected):
    params = _params(head_ratio=0.5, **settings)
    with pytest.raises(InputError) as err:
        run(model_dir=tiny_bert, text=_text_file(tmp_path, case), model="p", params=params, out_dir=tmp_path / "o",
            key="k")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"head_ratio": 1.0}, "less than 1"),
        ({"ffn_ratio": -0.1}, "greater than or equal to 0"),
        ({"scope": "model"}, "'layer' or 'global'"),
        ({"heads": 0.5}, "Extra inputs are not permitted"),
        ({"distill": {"cosine_weight": 0, "mse_weight": 0}}, "both 0"),
        ({"distill": {"steps": -1}}, "greater than or equal to 0"),
    ],
)
def test_bad_settings_are_validation_errors(settings, expected):
    with pytest.raises(ValidationError, match=expected):
        PruneSettings(**settings)


def test_missing_text_pruned_input_and_broken_spec(tiny_bert, tmp_path):
    with pytest.raises(InputError, match="needs the distillation text"):
        run(model_dir=tiny_bert, text=None, model="p", params=_params(ffn_ratio=0.5), out_dir=tmp_path / "o", key="k")
    run(model_dir=tiny_bert, text=None, model="dense", params=_params(), out_dir=tmp_path / "d", key="k")
    with pytest.raises(InputError, match="already pruned"):
        run(model_dir=tmp_path / "d" / "model", text=None, model="dense", params=_params(), out_dir=tmp_path / "x",
            key="k")
    (tmp_path / "d" / "model" / "prune.json").write_text('{"format": 1, "layers": [{"heads": []}]}')
    with pytest.raises(InputError, match="prune.json") as err:
        load_encoder(tmp_path / "d" / "model", "eager")
    assert "\n" not in str(err.value)
