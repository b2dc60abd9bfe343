"""fetch_model: safe sources only, clear errors, a content hash of the weights."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SENTENCE_ENCODER
from tiny_models import make_tiny_encoder

from tasks.core.errors import InputError
from tasks.core.fingerprint import file_sha256
from tasks.stages.fetch_model import FetchModelParams, resolve_source, run


def test_copies_config_tokenizer_and_safetensors_with_hash(tiny_bert, tmp_path):
    payload = run(tiny_bert, FetchModelParams(source="path", path=tiny_bert), SENTENCE_ENCODER, tmp_path / "out", key="k")
    model = tmp_path / "out" / "model"
    assert {p.name for p in model.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"}
    assert payload["weights_sha256"] == file_sha256(tiny_bert / "model.safetensors")
    assert json.loads((tmp_path / "out" / "stage.json").read_text())["key"] == "k"


def test_default_source_is_the_embedded_package_model():
    folder = resolve_source(FetchModelParams())
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


def test_roberta_is_supported(tmp_path):
    folder = make_tiny_encoder(tmp_path / "roberta", "roberta")
    assert run(folder, FetchModelParams(source="path", path=folder), SENTENCE_ENCODER, tmp_path / "out", key="k")["model_type"] == "roberta"


@pytest.fixture
def model_copy(tiny_bert, tmp_path):
    return shutil.copytree(tiny_bert, tmp_path / "copy")


def _run(folder, tmp_path, **kw):
    return run(folder, FetchModelParams(source="path", path=folder, **kw), SENTENCE_ENCODER, tmp_path / "out", key="k")


def test_pickle_weights_need_opt_in(model_copy, tmp_path):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle.*allow_pickle: true"):
        _run(model_copy, tmp_path)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert _run(model_copy, tmp_path, allow_pickle=True)["weights"] == "pytorch_model.bin"


def test_remote_code_needs_opt_in(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_x.XModel"}
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="trust_remote_code"):
        _run(model_copy, tmp_path)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_config", "not a Hugging Face model folder"),
        ("gpt2", "model_type 'gpt2' is not a supported encoder"),
        ("no_weights", "no weights"),
        ("bad_json", "not valid JSON"),
        ("truncated", "model.safetensors: not a readable safetensors file"),
    ],
)
def test_unusable_folders(model_copy, tmp_path, breakage, message):
    config = model_copy / "config.json"
    if breakage == "no_config":
        config.unlink()
    elif breakage == "gpt2":
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "gpt2"}))
    elif breakage == "no_weights":
        (model_copy / "model.safetensors").unlink()
    elif breakage == "truncated":  # a download cut short must not replace a good fetched model
        weights = model_copy / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        config.write_text("{not json")
    with pytest.raises(InputError, match=message):
        _run(model_copy, tmp_path)


def test_missing_path_and_missing_package(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_source(FetchModelParams(source="path", path=tmp_path / "nope"))
    with pytest.raises(InputError, match="is not installed"):
        resolve_source(FetchModelParams(package="no-such-model-package"))


def test_hub_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="offline"):
        resolve_source(FetchModelParams(source="hub", hub_id="sentence-transformers/all-MiniLM-L6-v2", revision="c9745ed"))
