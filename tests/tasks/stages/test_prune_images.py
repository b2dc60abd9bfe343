"""Channel pruning of image classifiers (tasks.families.channel_pruning through stage prune): tiny random ResNet and
MobileNetV2 folders (Hugging Face configs, no download) and the plain-PyTorch torch_package path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from tiny_models import make_images, make_tiny_encoder, make_tiny_image_classifier

from tasks.builders.export import ExportOnnxParams, export
from tasks.core.errors import ConfigError, InputError
from tasks.data.evaluation import EvaluationParams
from tasks.families import channel_pruning
from tasks.families.image_classifier import FAMILY, ImageClassifierSettings
from tasks.families.sentence_encoder import SentenceEncoderSettings
from tasks.stages import prune as prune_stage

SETTINGS = ImageClassifierSettings()
EVAL = EvaluationParams.model_construct(sets=[])  # a search is not run here: nothing is scored


def _pool(tmp_path, n=10) -> str:
    paths = make_images(tmp_path / "pool", n, seed=5)
    pd.DataFrame({"path": [str(p) for p in paths]}).to_csv(tmp_path / "image_pool.csv", index=False)
    return tmp_path / "image_pool.csv"


def _run(tmp_path, model_dir, name, settings, pool=None, seq_lens=(32,)):
    params = prune_stage.PruneParams(models={name: settings})
    return prune_stage.run(model_dir=model_dir, text=pool, model=name, params=params, family=SETTINGS,
                           evaluation_params=EVAL, accuracy_budget=1.0, seq_lens=list(seq_lens),
                           out_dir=tmp_path / "out" / name, key="k")


def _logits(folder, pixels):
    loaded = FAMILY.load(folder, SETTINGS)
    module, _ = FAMILY.export_module(loaded, SETTINGS)
    with torch.no_grad():
        return module(torch.from_numpy(pixels))


PRUNE = prune_stage.PruneSettings(channel_ratio=0.5, channel_multiple=1, seed=0,
                                  distill=prune_stage.DistillSettings(steps=3, batch_size=4, heldout_sentences=2,
                                                                      augment_views=1, temperature=2.0))


@pytest.mark.parametrize("architecture", ["resnet", "mobilenet_v2"])
def test_channels_shrink_by_the_ratio_and_the_folder_reloads_and_exports(tmp_path, architecture):
    model = make_tiny_image_classifier(tmp_path / "m", architecture)
    payload = _run(tmp_path, model, "pruned", PRUNE, _pool(tmp_path))

    folder = tmp_path / "out" / "pruned" / "model"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "prune.json"}
    spec = json.loads((folder / "prune.json").read_text())
    assert spec["kind"] == "conv_channels" and spec["settings"]["channel_ratio"] == 0.5
    dense, pruned = FAMILY.load(model, SETTINGS).model, FAMILY.load(folder, SETTINGS).model
    dense_convs, pruned_convs = channel_pruning.shapes(dense), channel_pruning.shapes(pruned)
    shrunk = [name for name in spec["layers"] if name in dense_convs and "out" in spec["layers"][name]
              and pruned_convs[name][0] < dense_convs[name][0]]
    assert shrunk, spec["layers"].keys()
    for name in shrunk:  # round(0.5 * n) removed from every pruned group (channel_multiple 1)
        n = dense_convs[name][0]
        assert pruned_convs[name][0] == n - int(np.floor(0.5 * n + 0.5))
    assert payload["macs_after"] < payload["macs_before"] and payload["params_after"]["total"] < payload["params_before"]["total"]
    assert len(payload["distill"]["loss_curve"]) == 3 and payload["distill"]["train_views"] == 2 * 8
    assert payload["groups"]["left_whole"], "residual groups stay whole by default"
    # The classifier keeps its classes; the folder exports and ONNX Runtime agrees with torch.
    assert FAMILY.class_names(folder) == FAMILY.class_names(model)
    # Random weights and BatchNorm statistics re-estimated on 8 random images give large logits: the absolute bar
    # is loosened, the cosine bar (0.9999) is not.
    record = export(folder, 32, ExportOnnxParams(verify_max_abs_err=1e-3), SETTINGS, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").is_file() and record


@pytest.mark.parametrize("architecture", ["resnet", "mobilenet_v2"])
def test_a_zero_ratio_prune_gives_the_dense_outputs_bit_for_bit(tmp_path, architecture):
    model = make_tiny_image_classifier(tmp_path / "m", architecture)
    payload = _run(tmp_path, model, "dense", prune_stage.PruneSettings())
    folder = tmp_path / "out" / "dense" / "model"
    assert payload["distill"] == {"skipped": "nothing pruned"} and payload["macs_ratio"] == 1.0
    pixels = FAMILY.samples(FAMILY.load_preprocessor(model), [str(p) for p in make_images(tmp_path / "x", 3)], 32)
    assert torch.equal(_logits(folder, pixels["pixel_values"]), _logits(model, pixels["pixel_values"]))


def test_a_torch_package_model_prunes_and_reloads_without_pickle(tmp_path):
    """The plain-PyTorch path (source: torch_package): rebuilt from its architecture, sliced, weights loaded strictly."""
    from tasks.families import torch_package

    folder = tmp_path / "tp"
    folder.mkdir()
    config = {"model_type": torch_package.MODEL_TYPE, "architecture": "tiny_torch_arch:TinyConvNet",
              "architecture_args": {"width": 16}, "id2label": {str(i): f"c{i}" for i in range(10)}}
    (folder / "config.json").write_text(json.dumps(config))
    model = torch_package.build(config["architecture"], config["architecture_args"], "test")
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    FAMILY.save_preprocessor(FAMILY.settings(preprocess={"mean": [0.5] * 3, "std": [0.5] * 3}).preprocess.spec(), folder)
    settings = PRUNE.model_copy(update={"channel_ratio": 0.25, "channel_multiple": 4})
    payload = _run(tmp_path, folder, "pruned", settings, _pool(tmp_path))
    pruned = FAMILY.load(tmp_path / "out" / "pruned" / "model", SETTINGS).model
    assert pruned.conv.out_channels == 12 and pruned.bn.num_features == 12 and pruned.fc.in_features == 12
    assert pruned.fc.out_features == 10 and payload["params_ratio"] < 1


def test_pruning_settings_of_the_other_kind_of_model_are_one_line(tmp_path, monkeypatch):
    from conftest import tiny_params

    from tasks.config import load_config

    monkeypatch.chdir(tmp_path)
    model = make_tiny_image_classifier(tmp_path / "m", "resnet")
    photos = make_images(tmp_path / "photos", 2)
    params = tiny_params(model)
    params.update(seq_lens=[32], models=["dense", "pruned"], family={"name": "image_classifier"},
                  evaluation={"sets": [{"name": "photos", "format": "images", "path": str(photos[0].parent)}]},
                  calibration_data={"images": [{"path": str(_pool(tmp_path))}], "samples": 2})
    params["calibration_data"]["images"][0]["format"] = "csv"
    params["prune"] = {"models": {"dense": {}, "pruned": {"head_ratio": 0.25}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "params.yaml")
    assert "prune.models.pruned.head_ratio: a transformer-encoder setting, but family image_classifier prunes " \
           "convolution channels" in str(err.value) and "\n" not in str(err.value)
    params["prune"]["models"]["pruned"] = {"search": [{"channel_ratio": 0.25}, {"ffn_ratio": 0.5}]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"prune.models.pruned.search\[1\].ffn_ratio: a transformer-encoder setting"):
        load_config(tmp_path / "params.yaml")
    params["prune"]["models"]["pruned"] = {"channel_ratio": 0.25, "distill": {"augment_views": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_config(tmp_path / "params.yaml").prune.model("pruned").channel_ratio == 0.25

    encoder = make_tiny_encoder(tmp_path / "enc")
    with pytest.raises(InputError, match=r"^prune.models.pruned.channel_ratio: an image-classifier setting, but "
                                         r"family sentence_encoder prunes a transformer encoder"):
        prune_stage.run(model_dir=encoder, text=None, model="pruned",
                        params=prune_stage.PruneParams(models={"pruned": {"channel_ratio": 0.5}}),
                        family=SentenceEncoderSettings(),
                        evaluation_params=EVAL, accuracy_budget=1.0, seq_lens=[16], out_dir=tmp_path / "o", key="k")


def test_a_model_without_prunable_convolution_channels_is_one_line(tmp_path):
    model = make_tiny_image_classifier(tmp_path / "m", "vit")
    with pytest.raises(InputError, match=r"^prune: this model has no convolution whose output channels can be pruned \(e.g. a ViT"):
        _run(tmp_path, model, "pruned", PRUNE, _pool(tmp_path))


def test_too_few_images_for_the_heldout_share_is_one_line(tmp_path):
    model = make_tiny_image_classifier(tmp_path / "m", "resnet")
    settings = PRUNE.model_copy(update={"distill": PRUNE.distill.model_copy(update={"heldout_sentences": 10})})
    with pytest.raises(InputError, match=r"10 images; prune.models.pruned.distill.heldout_sentences \(10\) must leave"):
        _run(tmp_path, model, "pruned", settings, _pool(tmp_path, n=10))
