"""calibration_data for an image family: images de-duplicated by content, never an evaluation image, a seeded
sample, float32 pixel_values per image size; and what config validation refuses for images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from tiny_models import make_images, make_tiny_image_classifier

from tasks.config import load_config
from tasks.core.errors import ConfigError, InputError
from tasks.data.evaluation import EvaluationParams
from tasks.data.images import ImageSource
from tasks.families.image_classifier import FAMILY, ImageClassifierSettings
from tasks.stages.calibration_data import IMAGE_POOL, CalibrationDataParams, calib_name, run

SETTINGS = ImageClassifierSettings()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_image_classifier(tmp_path_factory.mktemp("model") / "resnet", "resnet")


def _calibrate(tmp_path, model, sources, paths, evaluation, samples=5, seed=0, name="out"):
    params = CalibrationDataParams(images=sources, samples=samples, seed=seed)
    return run(model, paths, [32, 24], params, SETTINGS, evaluation, tmp_path / name, key="k")


def test_images_are_deduplicated_sampled_by_seed_and_preprocessed(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "calib", 6, seed=1)
    # A CSV listing two of the folder's images again (by content) and one other image.
    extra = make_images(tmp_path / "more", 1, seed=2)
    folder_images = sorted((tmp_path / "calib").iterdir())
    (tmp_path / "copy.png").write_bytes(folder_images[0].read_bytes())
    pd.DataFrame({"path": ["copy.png", f"calib/{folder_images[1].name}", f"more/{extra[0].name}"]}).to_csv(
        tmp_path / "list.csv", index=False)
    sources = [ImageSource(path="calib", format="folder"), ImageSource(path="list.csv", format="csv")]
    payload = _calibrate(tmp_path, model, sources, [s.path for s in sources], None)
    assert payload["images_listed"] == 9 and payload["unique_images"] == 7 and payload["duplicates"] == 2
    out = tmp_path / "out"
    pool = pd.read_csv(out / IMAGE_POOL)
    assert len(pool) == 7 and pool["sha256"].is_unique
    sample = pd.read_csv(out / "images.csv")
    assert list(sample.columns) == ["path", "sha256", "source", "width", "height"] and len(sample) == 5
    assert payload["sampled_sha256"] == sample["sha256"].tolist()
    with np.load(out / calib_name(32)) as npz:
        arrays = dict(npz)
    assert list(arrays) == ["pixel_values"] and arrays["pixel_values"].dtype == np.float32
    assert arrays["pixel_values"].shape == (5, 3, 32, 32)
    expected = FAMILY.samples(FAMILY.load_preprocessor(model), sample["path"].tolist(), 32)["pixel_values"]
    assert np.array_equal(arrays["pixel_values"], expected)
    with np.load(out / calib_name(24)) as npz:
        assert npz["pixel_values"].shape == (5, 3, 24, 24)
    again = _calibrate(tmp_path, model, sources, [s.path for s in sources], None, name="again")
    other = _calibrate(tmp_path, model, sources, [s.path for s in sources], None, seed=7, name="other")
    assert again["sampled_sha256"] == payload["sampled_sha256"] != other["sampled_sha256"]
    with pytest.raises(InputError, match=r"only 7 distinct images for calibration_data.samples=8"):
        _calibrate(tmp_path, model, sources, [s.path for s in sources], None, samples=8, name="big")


def test_an_evaluation_image_under_another_name_is_refused(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluated = make_images(tmp_path / "eval", 4, seed=5)
    make_images(tmp_path / "calib", 6, seed=6)
    (tmp_path / "calib" / "renamed.png").write_bytes(evaluated[2].read_bytes())
    evaluation = EvaluationParams(sets=[{"name": "photos", "format": "images", "path": "eval"}])
    with pytest.raises(InputError, match=r"calib: 1 calibration images are images of evaluation set 'photos' "
                                         r"\(e.g. calib/renamed.png is .*eval/img_5_002.png\); never calibrate"):
        _calibrate(tmp_path, model, [ImageSource(path="calib", format="folder")], ["calib"], evaluation)


def _params(tmp_path, model, **changes) -> dict:
    params = {
        "seq_lens": [32],
        "family": {"name": "image_classifier"},
        "fetch_model": {"source": "path", "path": str(model)},
        "evaluation": {"sets": [{"name": "photos", "format": "images", "path": "eval"}]},
        "calibration_data": {"images": [{"path": "calib", "format": "folder"}], "samples": 4},
    }
    params.update(changes)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def test_config_checks_the_family_modality(tmp_path, model):
    _params(tmp_path, model)
    assert load_config(tmp_path / "params.yaml").calibration_data.images[0].format == "folder"
    _params(tmp_path, model, calibration_data={"sources": [{"path": "a.txt", "format": "txt"}]})
    with pytest.raises(ConfigError, match=r"calibration_data.sources: family image_classifier calibrates on images"):
        load_config(tmp_path / "params.yaml")
    _params(tmp_path, model, family={"name": "sentence_encoder"},
            evaluation={"sets": [{"name": "p", "format": "sentence_pairs", "path": "p.csv"}]})
    with pytest.raises(ConfigError, match=r"calibration_data.images: family sentence_encoder calibrates on text"):
        load_config(tmp_path / "params.yaml")
    _params(tmp_path, model, evaluation={"sets": [{"name": "t", "format": "labelled_text", "path": "t.csv"}]})
    with pytest.raises(ConfigError, match=r"format labelled_text cannot score family image_classifier"):
        load_config(tmp_path / "params.yaml")
    _params(tmp_path, model, calibration_data={"images": [{"path": "eval/sub", "format": "folder"}]})
    with pytest.raises(ConfigError, match=r"calibration_data.images\[0\]: eval/sub shares a folder with evaluation "
                                          r"set 'photos'"):
        load_config(tmp_path / "params.yaml")
    _params(tmp_path, model, models=["dense", "small"],
            prune={"models": {"dense": {}, "small": {"head_ratio": 0.5, "ffn_ratio": 0.5}}})
    with pytest.raises(ConfigError, match=r"prune.models.small.head_ratio: a transformer-encoder setting, but family "
                                          r"image_classifier prunes convolution channels"):
        load_config(tmp_path / "params.yaml")
