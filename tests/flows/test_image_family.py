"""Bring your own image classifier: tiny random ResNet, MobileNetV2 and ViT folders (Hugging Face layout) through the
whole DAG (fetch -> export at 32 px -> surgery -> calibration on images -> fp32 and an 8-bit per-channel QDQ variant
-> compile for ORT CPU -> benchmark -> report), scored by top-1 agreement with fp32 on unlabelled images and by top-1
accuracy on a labelled CSV.

A full flow per architecture takes about a minute on 2 cores: slow tests, run in CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_workspace, tiny_params
from tiny_models import IMAGE_ARCHITECTURES, IMAGE_CLASSES, make_images, make_tiny_image_classifier

from flows.pipeline import pipeline
from tasks.core.schemas import COMPILE_ROWS, EVALUATION_ROWS
from tasks.stages.report import REPORT_TABLE

INT8 = "ort_qdq_a8w8_cnn"


def _labels(model, images) -> list[str]:
    """The torch model's own top class for the first 4 images and its lowest for the last 2: fp32 top-1 = 4/6."""
    import torch

    from tasks.families.image_classifier import FAMILY, ImageClassifierSettings

    loaded = FAMILY.load(model, ImageClassifierSettings())
    pixels = FAMILY.samples(loaded.preprocessor, [str(p) for p in images], 32)["pixel_values"]
    with torch.no_grad():
        logits = loaded.model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    picks = [*logits[:4].argmax(axis=1), *logits[4:].argmin(axis=1)]
    return [IMAGE_CLASSES[i] for i in picks]


PRUNED = {"channel_ratio": 0.5, "channel_multiple": 1, "seed": 0,
          "distill": {"steps": 4, "batch_size": 4, "heldout_sentences": 2, "temperature": 2.0, "augment_views": 1}}


def _params(tmp_path, model, pruned: bool = False) -> dict:
    data = tmp_path / "data"
    make_images(data / "calib", 10, seed=1)
    make_images(data / "photos", 12, seed=2)
    labelled = make_images(data / "labelled", 6, seed=3)
    pd.DataFrame({"path": [str(p) for p in labelled], "label": _labels(model, labelled)}).to_csv(
        data / "labelled.csv", index=False)
    params = tiny_params(model)
    params.update(
        seq_lens=[32], models=["dense", "pruned"] if pruned else ["dense"], variants=["fp32", INT8],
        family={"name": "image_classifier"},
        targets=[{"variant": "fp32", "device": "ort_cpu"}, {"variant": INT8, "device": "ort_cpu"}],
        evaluation={"sets": [{"name": "photos", "format": "images", "path": str(data / "photos")},
                             {"name": "labelled", "format": "labelled_images", "path": str(data / "labelled.csv")}]},
        calibration_data={"images": [{"path": str(data / "calib"), "format": "folder"}], "samples": 8, "seed": 0},
    )
    params["paths"]["read_roots"].append(str(data))
    params["prune"] = {"models": {"dense": {}, "pruned": PRUNED}}
    # The pruned random MobileNetV2's BatchNorm statistics, re-estimated on 8 random images, give large logits:
    # ONNX Runtime and torch differ by ~1e-4 absolute (cosine 1.0).
    params["export_onnx"]["verify_max_abs_err"] = 1e-3
    params["quantize"]["variants"][INT8] = {"method": "ort_static", "activation_type": "uint8", "weight_type": "int8",
                                            "per_channel": True, "calibrate_method": "MinMax"}
    params["compile"]["jobs"] = [{"variant": INT8, "device": "ort_cpu", "target": "host"}]
    params["benchmark"].update(quick=True)
    params["report"]["seq_len_choice"]["text"] = {"path": "artifacts/calibration_data/image_pool.csv", "format": "csv",
                                                  "column": "path"}
    return params


@pytest.mark.slow
@pytest.mark.parametrize("architecture", IMAGE_ARCHITECTURES)
def test_every_image_architecture_runs_the_dag(tmp_path, monkeypatch, architecture):
    """The CNNs also run a channel-pruned copy (`pruned`) through the DAG; a ViT has no convolution channels to prune."""
    model = make_tiny_image_classifier(tmp_path / "models" / architecture, architecture)
    pruned = architecture != "vit"
    workspace = make_workspace(tmp_path, _params(tmp_path, model, pruned), monkeypatch)
    result = pipeline(project_dir=str(workspace))
    assert all(state != "Failed" for state in result["stages"].values()), result["stages"]

    artifacts = workspace / "artifacts"
    assert (artifacts / "fetch_model" / "model" / "preprocess.json").is_file()
    with np.load(artifacts / "calibration_data" / "calib_seq32.npz") as npz:
        assert npz["pixel_values"].shape == (8, 3, 32, 32) and npz["pixel_values"].dtype == np.float32
    assert len(pd.read_csv(artifacts / "calibration_data" / "image_pool.csv")) == 10
    compiled = COMPILE_ROWS.validate(pd.read_csv(workspace / "metrics" / "compile.csv"))
    assert list(compiled["status"]) == ["compiled"] * (2 if pruned else 1) and (compiled["verify_min_cosine"] >= 0.999).all()

    table = REPORT_TABLE.validate(pd.read_csv(workspace / "metrics" / "benchmark.csv"))
    assert set(table["model"]) == ({"dense", "pruned"} if pruned else {"dense"})
    if pruned:
        stamp = json.loads((artifacts / "prune" / "pruned" / "stage.json").read_text())
        assert stamp["macs_after"] < stamp["macs_before"] and stamp["distill"]["loss_curve"]
        assert (artifacts / "prune" / "pruned" / "model" / "prune.json").is_file()
        row = table[(table["model"] == "pruned") & (table["variant"] == "fp32")].iloc[0]
        assert 0.0 <= row["metric_value"] <= 100.0 and row["eval_items"] == 12
    table = table[table["model"] == "dense"]
    assert set(table["variant"]) == {"fp32", INT8}
    assert (table["eval_set"] == "photos").all() and (table["metric_name"] == "top1_agreement").all()
    fp32 = table[table["variant"] == "fp32"].iloc[0]
    int8 = table[table["variant"] == INT8].iloc[0]
    assert fp32["metric_value"] == 100.0 and fp32["cosine_to_fp32_min"] > 0.9999 and fp32["eval_items"] == 12
    assert 50.0 <= int8["metric_value"] <= 100.0 and int8["cosine_to_fp32_mean"] > 0.9

    scores = EVALUATION_ROWS.validate(pd.read_csv(workspace / "metrics" / "evaluation.csv"))
    labelled = scores[(scores["eval_set"] == "labelled") & (scores["model"] == "dense")].set_index("variant")
    assert set(labelled["metric_name"]) == {"top1"} and (labelled["items"] == 6).all()
    assert labelled.loc["fp32", "metric_value"] == pytest.approx(400 / 6)
    assert labelled.loc[INT8, "metric_value"] in (pytest.approx(300 / 6), pytest.approx(400 / 6), pytest.approx(500 / 6))
    report = next((workspace / "reports").rglob("index.html")).read_text()
    assert "photos top-1 agreement with fp32 (%)" in report and "photos accuracy" not in report
    assert "32 px keep 100.0% of 10 inputs whole" in (workspace / "metrics" / "summary.json").read_text()

    again = pipeline(project_dir=str(workspace))
    assert {name for name, state in again["stages"].items() if state != "Cached"} <= {"report"}, again["stages"]


def test_the_images_a_csv_names_are_part_of_the_stage_keys(tmp_path, monkeypatch):
    """A CSV's hash does not cover the images it names: each is watched by the stages reading it (and a DVC dep)."""
    from flows import dvc_yaml
    from flows.stages import benchmark, calibration_data, preflight, reference
    from tasks.config import load_config
    from tasks.core.errors import ConfigError, InputError

    monkeypatch.chdir(tmp_path)
    calib = make_images(tmp_path / "calib", 3, seed=1)
    photos = make_images(tmp_path / "photos", 3, seed=2)
    pd.DataFrame({"path": [f"calib/{p.name}" for p in calib]}).to_csv(tmp_path / "calib.csv", index=False)
    pd.DataFrame({"path": [f"photos/{p.name}" for p in photos]}).to_csv(tmp_path / "photos.csv", index=False)
    params = _params(tmp_path, make_tiny_image_classifier(tmp_path / "models" / "resnet"))
    params.update(evaluation={"sets": [{"name": "photos", "format": "images", "path": "photos.csv", "reader": "csv"}]},
                  calibration_data={"images": [{"path": "calib.csv", "format": "csv"}], "samples": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(tmp_path / "params.yaml")
    calibration_watch = set(calibration_data(cfg).watch.values())
    assert {Path(f"calib/{p.name}") for p in calib} <= {Path(p) for p in calibration_watch}
    for watched in (calibration_watch, set(reference(cfg, 32).watch.values()),
                    set(benchmark(cfg, "dense", 0, cfg.targets[0], 32).watch.values())):
        assert {Path(f"photos/{p.name}") for p in photos} <= {Path(p) for p in watched}
    stages = yaml.safe_load(dvc_yaml.render(cfg))["stages"]
    assert f"photos/{photos[0].name}" in stages["reference"]["do"]["deps"]
    assert f"calib/{calib[0].name}" in stages["calibration_data"]["deps"]
    preflight(cfg)
    outside = make_images(tmp_path.parent / f"{tmp_path.name}-elsewhere", 1)[0]
    pd.DataFrame({"path": [f"calib/{calib[0].name}", str(outside)]}).to_csv(tmp_path / "calib.csv", index=False)
    with pytest.raises(ConfigError, match=r"calibration_data.images\[0\]: its CSV names .*elsewhere/img_0_000.png, "
                                          r"outside the project; add its folder to paths.read_roots"):
        preflight(cfg)
    photos[1].unlink()
    with pytest.raises(InputError, match=rf"photos.csv: image photos/{photos[1].name} not found \(\+0 more\)"):
        reference(cfg, 32)


def test_a_package_list_may_name_only_files_inside_that_package(tmp_path, monkeypatch):
    from helpers import make_distribution

    from flows.stages import preflight
    from tasks.config import load_config
    from tasks.core.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    site = tmp_path / "site"
    photos = make_images(site / "photo_pkg", 3, seed=2)
    make_distribution(site, "photo-pkg", [p.relative_to(site).as_posix() for p in photos])
    monkeypatch.syspath_prepend(str(site))
    pd.DataFrame({"path": [p.relative_to(site).as_posix() for p in photos]}).to_csv(tmp_path / "photos.csv", index=False)
    params = _params(tmp_path, make_tiny_image_classifier(tmp_path / "models" / "resnet"))
    params["evaluation"] = {"sets": [{"name": "photos", "format": "images", "path": "photos.csv", "reader": "csv",
                                      "package": "photo-pkg"}]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    preflight(load_config(tmp_path / "params.yaml"))  # site-packages-like folder, outside the project: allowed
    escaped = make_images(tmp_path / "elsewhere", 1)[0]
    pd.DataFrame({"path": ["photo_pkg/" + photos[0].name, "../elsewhere/" + escaped.name]}).to_csv(
        tmp_path / "photos.csv", index=False)
    with pytest.raises(ConfigError, match=r"evaluation.sets\[0\] \(photos\): its CSV names .*img_0_000.png, outside "
                                          r"package photo-pkg; name files inside it"):
        preflight(load_config(tmp_path / "params.yaml"))
