"""The image_classifier family on tiny random ResNet, MobileNetV2 and ViT folders: our preprocessing equals the
Hugging Face image processor's, the fetched folder records it, and the exported graph matches torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import IMAGE_ARCHITECTURES, make_images, make_tiny_image_classifier

from tasks.core.errors import InputError
from tasks.families.image_classifier import FAMILY, PREPROCESS, ImageClassifierSettings, from_hf

SETTINGS = ImageClassifierSettings()


@pytest.fixture(scope="module", params=IMAGE_ARCHITECTURES)
def folder(request, tmp_path_factory):
    return make_tiny_image_classifier(tmp_path_factory.mktemp("image") / request.param, request.param)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("photos"), 8, seed=4)


def test_samples_equal_the_hugging_face_processor_at_the_native_size(folder, images):
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    expected = processor([Image.open(p).convert("RGB") for p in images], return_tensors="np")["pixel_values"]
    ours = FAMILY.samples(FAMILY.load_preprocessor(folder), [str(p) for p in images], 32)["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (8, 3, 32, 32)
    assert np.abs(ours - expected).max() < 1e-5


def test_a_fetched_folder_records_its_preprocessing(folder, tmp_path):
    from tasks.stages.fetch_model import FetchModelParams
    from tasks.stages.fetch_model import run as fetch

    payload = fetch(folder, FetchModelParams(source="path", path=folder), SETTINGS, tmp_path / "fetch", key="k")
    spec = json.loads((tmp_path / "fetch" / "model" / PREPROCESS).read_text())
    assert spec["resize"] == ("squash" if folder.name == "vit" else "shortest_edge")
    assert spec["mean"] and spec["std"] and payload["family"] == "image_classifier"
    assert FAMILY.load_preprocessor(tmp_path / "fetch" / "model") == FAMILY.load_preprocessor(folder)


@pytest.mark.parametrize("size", [32, 48])
def test_the_export_matches_torch_at_the_native_and_another_size(folder, tmp_path, size):
    import onnx

    from tasks.builders.export import ExportOnnxParams, export

    record = export(folder, size, ExportOnnxParams(), SETTINGS, tmp_path / "model.onnx")
    assert record["inputs"] == ["pixel_values"] and record["output"] == "logits" and record["output_width"] == 10
    assert record["verify_max_abs_err"] < 1e-4 and record["classes"][0] == "class_0"
    graph = onnx.load(tmp_path / "model.onnx").graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, size, size]


def test_what_the_family_refuses(folder, tmp_path):
    from transformers import AutoConfig

    from tasks.builders.export import ExportOnnxParams, export

    if folder.name == "vit":  # patch size 8
        with pytest.raises(InputError, match=r"seq_lens: 36 px is not a multiple of the vit patch size 8; use a "
                                             r"multiple of 8"):
            export(folder, 36, ExportOnnxParams(), SETTINGS, tmp_path / "model.onnx")

    assert FAMILY.pruning_layout(AutoConfig.from_pretrained(folder)).kind == "conv_channels"  # tests/tasks/stages/test_prune_images.py
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(InputError, match=r"config.json: model_type 'bert' .* is not an image classifier"):
        FAMILY.check_folder(folder, {**config, "model_type": "bert"}, SETTINGS)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(InputError, match=r"bare: no preprocess.json or preprocessor_config.json"):
        FAMILY.check_folder(bare, config, SETTINGS)
    assert (FAMILY.input_lengths(None, ["a.png", "b.png"]) == 0).all()
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    if folder.name == "vit":
        cropped = {**processor, "do_center_crop": True, "crop_size": {"height": 24, "width": 24}}
        with pytest.raises(InputError, match=r"crops \{'height': 24, 'width': 24\} out of the resized"):
            from_hf(cropped, folder / "preprocessor_config.json")
    if folder.name == "resnet":  # ConvNeXt-style processors resize straight to the square from 384 px
        assert from_hf({**processor, "size": {"shortest_edge": 384}}, folder).resize == "squash"
    assert len(FAMILY.verify_samples()) >= 8
