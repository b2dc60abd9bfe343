"""Stage prune: heads and FFN channels really removed; distillation recovers; the pruned folder exports.

Importance, selection and slicing themselves: tests/tasks/families/test_encoder_pruning.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from conftest import SENTENCE_ENCODER
from helpers import sentences
from pydantic import ValidationError
from safetensors.torch import load_file
from tiny_models import make_tiny_encoder

from tasks.config import load_config
from tasks.core.errors import InputError
from tasks.data.evaluation import EvaluationParams, SentencePairsSet
from tasks.families.distillation import DistillSettings
from tasks.families.sentence_encoder import FAMILY
from tasks.stages.export_onnx import ExportOnnxParams
from tasks.stages.export_onnx import run as export_onnx
from tasks.stages.prune import PruneParams, PruneSettings, run

REPO = Path(__file__).resolve().parents[3]

# Tiny BERT: hidden 32, 2 layers of 2 heads (head size 16), FFN 64, 64 positions.
FAST = DistillSettings(steps=0, batch_size=8, max_tokens=32, heldout_sentences=16)


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text_pool.csv"
    pd.DataFrame({"sentence": sentences(200, seed=0, end="."), "source": "x"}).to_csv(path, index=False)
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


def pairs_set(folder: Path, seed: int, n: int = 40, name: str = "pairs") -> SentencePairsSet:
    """A sentence-pairs evaluation set of seeded sentences (never the text fixture's, seed 0) and scores."""
    texts = sentences(2 * n, seed=seed, end="!")
    path = folder / f"{name}.csv"
    scores = np.random.default_rng(seed).uniform(0, 5, n)
    pd.DataFrame({"sentence1": texts[:n], "sentence2": texts[n:], "score": scores}).to_csv(path, index=False)
    return SentencePairsSet(name=name, path=path)


@pytest.fixture(scope="module")
def scoring(tmp_path_factory) -> dict:
    """What the stage takes besides the model: the evaluation sets a search scores on, the budget, lengths."""
    folder = tmp_path_factory.mktemp("eval")
    return {"evaluation_params": EvaluationParams(sets=[pairs_set(folder, seed=7)]), "accuracy_budget": 0.5,
            "seq_lens": [32]}


def _params(**settings) -> PruneParams:
    return PruneParams(models={"dense": PruneSettings(), "p": PruneSettings(**{"distill": FAST, **settings})})


def _embed(folder: Path, sentences: list[str]) -> np.ndarray:
    loaded = FAMILY.load(folder, SENTENCE_ENCODER, "eager")
    feeds = FAMILY.samples(loaded.preprocessor, sentences, 16)
    embedder, _ = FAMILY.export_module(loaded, SENTENCE_ENCODER)
    with torch.no_grad():
        return embedder(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()


def test_defaults_dense_is_unpruned_and_the_project_prunes():
    assert set(PruneParams().models) == {"dense"} and not PruneParams().model("dense").prunes
    params = load_config(REPO / "params.yaml").prune  # the project's models
    assert set(params.models) == {"dense", "pruned"}
    assert not params.model("dense").prunes and params.model("pruned").prunes
    with pytest.raises(InputError) as err:
        params.model("nope")
    assert "unknown model 'nope'" in str(err.value) and "\n" not in str(err.value)


def test_ratio_zero_is_the_fetched_model_bit_for_bit(tiny_bert, tmp_path, scoring):
    payload = run(model_dir=tiny_bert, text=None, model="dense", params=_params(), family=SENTENCE_ENCODER, **scoring,
                  out_dir=tmp_path / "o", key="k")
    folder = tmp_path / "o" / "model"
    original, saved = load_file(tiny_bert / "model.safetensors"), load_file(folder / "model.safetensors")
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    spec = json.loads((folder / "prune.json").read_text())
    assert [layer["heads"] for layer in spec["layers"]] == [[0, 1], [0, 1]]
    assert payload["params_after"] == payload["params_before"] and payload["distill"] == {"skipped": "nothing pruned"}
    assert json.loads((tmp_path / "o" / "stage.json").read_text())["key"] == "k"
    texts = sentences(4, seed=1, end=".")
    assert np.array_equal(_embed(folder, texts), _embed(tiny_bert, texts))


def test_heads_and_ffn_channels_are_removed(tiny_bert, text, tmp_path, scoring):
    params = _params(head_ratio=0.5, ffn_ratio=0.5, ffn_multiple=8)
    payload = run(model_dir=tiny_bert, text=text, model="p", params=params, family=SENTENCE_ENCODER, **scoring,
                  out_dir=tmp_path / "o", key="k")
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
    model = FAMILY.load(tmp_path / "o" / "model", SENTENCE_ENCODER, "sdpa").model
    assert model.encoder.layer[0].attention.self.num_attention_heads == 1


def test_distillation_recovers_and_is_deterministic(spread_bert, text, tmp_path, scoring):
    distill = DistillSettings(steps=30, lr=2e-3, batch_size=16, max_tokens=32, heldout_sentences=24, warmup_ratio=0)
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        params = _params(head_ratio=0.5, ffn_ratio=0.5, ffn_multiple=8, distill=distill, seed=seed)
        outs[name] = run(model_dir=spread_bert, text=text, model="p", params=params, family=SENTENCE_ENCODER, **scoring,
                         out_dir=tmp_path / name, key="k")
    d, cos = outs["a"]["distill"], outs["a"]["heldout_agreement_with_dense"]
    assert d["loss_last_window"] < 0.5 * d["loss_first"]
    # Half the heads and channels gone: the embedding is far off (~0.5) until distillation pulls it back.
    assert cos["before_distill"]["mean"] < 0.8 and cos["after_distill"]["mean"] > 0.95
    weights = {n: (tmp_path / n / "model" / "model.safetensors").read_bytes() for n in outs}
    assert weights["a"] == weights["b"] and weights["a"] != weights["c"]
    assert len(d["loss_curve"]) == 20 and d["loss_curve"][-1]["step"] == 30


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_pruned_model_exports_and_onnx_matches_torch(tiny_bert, text, tmp_path, model_type, scoring):
    source = tiny_bert if model_type == "bert" else make_tiny_encoder(tmp_path / "roberta", "roberta")
    params = _params(head_ratio=0.5, ffn_ratio=0.25, importance="activation")
    run(model_dir=source, text=text, model="p", params=params, family=SENTENCE_ENCODER,
        **scoring, out_dir=tmp_path / "p", key="k")
    payload = export_onnx(tmp_path / "p" / "model", 16, ExportOnnxParams(), SENTENCE_ENCODER, tmp_path / "onnx",
                          key="k")
    assert payload["verify_max_abs_err"] < 1e-4 and payload["verify_min_cosine"] > 0.9999

    graph = onnx.load(tmp_path / "onnx" / "model.onnx").graph
    dims = {tuple(init.dims) for init in graph.initializer}
    assert (32, 16) in dims and (32, 48) in dims and (48, 32) in dims  # q/k/v, FFN in, FFN out (transposed)
    assert (32, 64) not in dims  # no dense-width FFN left
    texts = sentences(3, seed=4, end=".")
    tokenizer = FAMILY.load_preprocessor(tmp_path / "p" / "model")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    torch_emb = _embed(tmp_path / "p" / "model", texts)
    for i, feeds in enumerate(FAMILY.samples(tokenizer, [s], 16) for s in texts):
        np.testing.assert_allclose(session.run(None, feeds)[0][0], torch_emb[i], atol=1e-5)


def _text_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.csv"
    if case == "good":
        pd.DataFrame({"sentence": sentences(60, seed=5, end=".")}).to_csv(path, index=False)
    elif case == "column":
        pd.DataFrame({"text": sentences(60, seed=5, end=".")}).to_csv(path, index=False)
    elif case == "few":
        pd.DataFrame({"sentence": sentences(10, seed=5, end=".")}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("case", "settings", "expected"),
    [
        ("column", {}, "no column 'sentence'"),
        ("few", {}, "needs at least heldout_sentences + batch_size"),
        ("missing", {}, "cannot read the distillation text"),
        ("good", {"distill": FAST.model_copy(update={"max_tokens": 100})}, "exceeds what the model takes (64)"),
    ],
)
def test_bad_text_is_a_one_line_input_error(tiny_bert, tmp_path, case, settings, expected, scoring):
    params = _params(head_ratio=0.5, **settings)
    with pytest.raises(InputError) as err:
        run(model_dir=tiny_bert, text=_text_file(tmp_path, case), model="p", params=params, family=SENTENCE_ENCODER,
            **scoring,
            out_dir=tmp_path / "o", key="k")
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


def test_missing_text_pruned_input_and_broken_spec(tiny_bert, tmp_path, scoring):
    with pytest.raises(InputError, match="needs the distillation text"):
        run(model_dir=tiny_bert, text=None, model="p", params=_params(ffn_ratio=0.5), family=SENTENCE_ENCODER,
            **scoring,
            out_dir=tmp_path / "o", key="k")
    run(model_dir=tiny_bert, text=None, model="dense", params=_params(), family=SENTENCE_ENCODER, **scoring,
        out_dir=tmp_path / "d", key="k")
    with pytest.raises(InputError, match="already pruned"):
        run(model_dir=tmp_path / "d" / "model", text=None, model="dense", params=_params(), family=SENTENCE_ENCODER,
            **scoring,
            out_dir=tmp_path / "x", key="k")
    (tmp_path / "d" / "model" / "prune.json").write_text('{"format": 1, "layers": [{"heads": []}]}')
    with pytest.raises(InputError, match="prune.json") as err:
        FAMILY.load(tmp_path / "d" / "model", SENTENCE_ENCODER, "eager")
    assert "\n" not in str(err.value)


def test_search_keeps_the_first_level_within_budget_on_every_set(tiny_bert, text, tmp_path, scoring):
    levels = [{"head_ratio": 0.5, "ffn_ratio": 0.75}, {"ffn_ratio": 0.25}]
    params = _params(search=levels)
    two_sets = {**scoring, "seq_lens": [16, 32], "evaluation_params": EvaluationParams(
        sets=[*scoring["evaluation_params"].sets, pairs_set(tmp_path, seed=8, name="other")])}

    # No level can hold a budget below any drop: every level is tried, the last one is written, and that is said.
    none = run(model_dir=tiny_bert, text=text, model="p", params=params, family=SENTENCE_ENCODER,
               **{**two_sets, "accuracy_budget": -1e9}, out_dir=tmp_path / "none", key="k")["search"]
    assert (none["met_budget"], none["chosen"], len(none["levels"])) == (False, None, 2)
    assert set(none["dense"]) == {"pairs@16", "pairs@32", "other@16", "other@32"}
    for level, wanted in zip(none["levels"], levels):
        assert level["head_ratio"] == wanted.get("head_ratio", 0) and level["ffn_ratio"] == wanted["ffn_ratio"]
        assert level["drops"] == pytest.approx({k: none["dense"][k] - v for k, v in level["scores"].items()})
        assert level["worst_drop"] == max(level["drops"].values()) and not level["within_budget"]
    assert none["levels"][0]["encoder_weights_kept"] < none["levels"][1]["encoder_weights_kept"] < 1
    spec = json.loads((tmp_path / "none" / "model" / "prune.json").read_text())
    assert [layer["intermediate_size"] for layer in spec["layers"]] == [48, 48]  # the last level: FFN -25 %

    # A budget the strongest level holds on every set and length: it is kept and the walk stops there.
    budget = none["levels"][0]["worst_drop"]
    held = run(model_dir=tiny_bert, text=text, model="p", params=params, family=SENTENCE_ENCODER,
               **{**two_sets, "accuracy_budget": budget}, out_dir=tmp_path / "held", key="k")["search"]
    assert (held["met_budget"], held["chosen"], len(held["levels"])) == (True, 0, 1)
    assert held["levels"][0]["scores"] == none["levels"][0]["scores"]  # deterministic: same seed, same text
    spec = json.loads((tmp_path / "held" / "model" / "prune.json").read_text())
    assert [len(layer["heads"]) for layer in spec["layers"]] == [1, 1]
    assert [layer["intermediate_size"] for layer in spec["layers"]] == [16, 16]


def test_distillation_refuses_text_that_is_evaluated(tiny_bert, tmp_path, scoring):
    evaluated = pd.read_csv(scoring["evaluation_params"].sets[0].path)["sentence2"].iloc[3]
    path = tmp_path / "text_pool.csv"
    pd.DataFrame({"sentence": [*sentences(60, seed=5, end="."), evaluated]}).to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        run(model_dir=tiny_bert, text=path, model="p", params=_params(ffn_ratio=0.5), family=SENTENCE_ENCODER,
            **scoring, out_dir=tmp_path / "o", key="k")
    message = str(err.value)
    assert "1 rows of the distillation text are texts of evaluation set 'pairs'" in message and "\n" not in message
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"head_ratio": 0.25, "search": [{"ffn_ratio": 0.5}]}, "not both"),
        ({"search": [{"head_ratio": 0, "ffn_ratio": 0}]}, "prunes nothing"),
    ],
)
def test_bad_search_settings_are_validation_errors(settings, expected):
    with pytest.raises(ValidationError, match=expected):
        PruneSettings(**settings)
