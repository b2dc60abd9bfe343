"""Image evaluation sets: top-1/top-5 accuracy on labelled images, and top-1 agreement with fp32 without labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tiny_models import make_images

from tasks.core.errors import InputError
from tasks.data.evaluation import (
    ImageFolderSet,
    ImagesSet,
    LabelledImagesSet,
    Scorer,
    check_columns,
    image_hashes,
    load,
    metric_label,
    reference_plan,
    write_reference_sets,
)

CLASSES = ["cat", "dog", "fox", "owl", "bee", "ant"]


def _onehot(indices, width=len(CLASSES), second=None):
    out = np.zeros((len(indices), width), dtype=np.float32)
    out[np.arange(len(indices)), indices] = 10
    if second is not None:
        out[np.arange(len(indices)), second] = 5
    return out


def test_labelled_images_score_top1_and_top5_with_names_or_indices(tmp_path):
    paths = make_images(tmp_path / "imgs", 4)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"file": [str(p) for p in paths], "y": ["cat", "1", "fox", "owl"]}).to_csv(csv, index=False)
    top1 = LabelledImagesSet(name="mine", path=csv, image="file", label="y")
    check_columns(top1)
    data = load(top1, CLASSES)
    assert data.inputs == [str(p) for p in paths] and data.items == 4 and not data.needs_reference
    # Right on rows 0 and 1; rows 2 and 3 have the truth second.
    outputs = _onehot([0, 1, 0, 0], second=[5, 5, 2, 3])
    assert data.score(outputs) == 50.0
    assert load(top1.model_copy(update={"metric": "top5"}), CLASSES).score(outputs) == 100.0
    assert metric_label("mine", "top5") == "mine top-5 accuracy %"
    with pytest.raises(InputError, match=r"labels.csv: evaluation set 'mine' \(path\) has no column\(s\) \['path'\]"):
        check_columns(LabelledImagesSet(name="mine", path=csv, label="y"))
    pd.DataFrame({"path": [str(paths[0])], "label": ["zebra"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match=r"bad.csv: label 'zebra' is neither a class name"):
        load(LabelledImagesSet(name="bad", path=tmp_path / "bad.csv"), CLASSES)


def test_an_image_folder_takes_labels_from_its_class_folders(tmp_path):
    make_images(tmp_path / "set" / "dog", 2, seed=1)
    make_images(tmp_path / "set" / "cat", 3, seed=2)
    folder = ImageFolderSet(name="folder", path=tmp_path / "set")
    check_columns(folder)
    data = load(folder, CLASSES)
    assert data.items == 5 and all("/cat/" in p for p in data.inputs[:3]) and "/dog/" in data.inputs[3]
    assert data.score(_onehot([0, 0, 0, 1, 0])) == 80.0
    assert load(folder, CLASSES, limit=2).inputs == data.inputs[:2]
    (tmp_path / "flat").mkdir()
    make_images(tmp_path / "flat", 2)
    with pytest.raises(InputError, match=r"flat: no class sub-folders with images"):
        load(ImageFolderSet(name="flat", path=tmp_path / "flat"), CLASSES)
    with pytest.raises(InputError, match=r"missing: evaluation set 'gone' \(path\) is not a folder"):
        check_columns(ImageFolderSet(name="gone", path=tmp_path / "missing"))


def test_images_without_labels_score_top1_agreement_with_the_fp32_rows(tmp_path, monkeypatch):
    make_images(tmp_path / "photos", 6, seed=3)
    photos = ImagesSet(name="photos", path=tmp_path / "photos")
    data = load(photos)
    assert data.needs_reference and data.metric_name == "top1_agreement" and data.items == 6
    assert metric_label("photos", data.metric_name) == "photos top-1 agreement with fp32 (%)"
    fp32 = _onehot([0, 1, 2, 3, 4, 5])
    assert data.score(fp32, fp32) == 100.0
    assert data.score(_onehot([0, 1, 2, 3, 4, 0]), fp32) == pytest.approx(500 / 6)
    # The same images listed by a CSV (paths relative to the project root) hash the same.
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "photos.csv"
    pd.DataFrame({"path": [f"photos/{p.name}" for p in (tmp_path / "photos").iterdir()]}).to_csv(csv, index=False)
    listed = ImagesSet(name="listed", path="photos.csv", reader="csv")
    check_columns(listed)
    hashes = image_hashes(listed)
    assert len(hashes) == 6 and set(hashes) == set(image_hashes(photos))


def test_the_scorer_gives_each_agreement_set_its_own_fp32_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = make_images(tmp_path / "imgs", 4)
    pd.DataFrame({"path": [p.name for p in paths], "label": ["cat", "dog", "cat", "dog"]}).to_csv(
        tmp_path / "labels.csv", index=False)
    labelled = LabelledImagesSet(name="labelled", path=tmp_path / "labels.csv")
    photos = ImagesSet(name="photos", path=tmp_path / "imgs")
    sets = [load(labelled, CLASSES), load(photos)]
    plan = reference_plan(sets, samples=3)
    assert [(name, len(inputs)) for name, inputs in plan] == [("labelled", 3), ("photos", 4)]
    # An agreement set runs whole even when it is the first set (its fp32 rows are its metric's reference).
    assert [(n, len(i)) for n, i in reference_plan(sets[::-1], samples=3)] == [("photos", 4)]
    # fp32 rows: the first 3 labelled images, then all 4 photos.
    reference = np.concatenate([_onehot([0, 1, 0]), _onehot([2, 3, 4, 5])])
    np.save(tmp_path / "outputs.npy", reference)
    write_reference_sets(tmp_path, plan)
    scorer = Scorer(sets, reference, tmp_path / "outputs.npy", [labelled, photos])
    outputs = np.concatenate([_onehot([0, 1, 0, 0]), _onehot([2, 3, 4, 0])])
    scores = {s["eval_set"]: s["metric_value"] for s in scorer.evaluations(outputs, "artifact")}
    assert scores == {"labelled": 75.0, "photos": 75.0}
    columns = scorer.columns(outputs, scorer.evaluations(outputs, "artifact"))
    assert columns["cosine_to_fp32_min"] == pytest.approx(1.0)  # the 3 labelled rows the reference holds
    write_reference_sets(tmp_path, [("labelled", ["a", "b", "c"]), ("photos", ["a", "b"])])
    short = Scorer(sets, reference[:5], tmp_path / "outputs.npy", [labelled, photos])
    with pytest.raises(InputError, match=r"evaluation set 'photos': 4 inputs, but the fp32 reference .* holds 2"):
        short.evaluations(outputs, "artifact")


def test_csvs_name_photos_inside_an_installed_package(tmp_path, monkeypatch):
    from helpers import make_distribution
    from pydantic import ValidationError

    from tasks.data.evaluation import listed_images
    from tasks.data.images import ImageSource, list_images

    site = tmp_path / "site"
    photos = make_images(site / "photo_pkg" / "data", 3)
    names = [p.relative_to(site).as_posix() for p in photos]
    make_distribution(site, "photo-pkg", names)
    monkeypatch.syspath_prepend(str(site))
    pd.DataFrame({"path": names[:2]}).to_csv(tmp_path / "eval.csv", index=False)
    pd.DataFrame({"path": names[2:], "label": ["3"]}).to_csv(tmp_path / "labelled.csv", index=False)
    monkeypatch.chdir(tmp_path)

    images = ImagesSet(name="photos", path="eval.csv", reader="csv", package="photo-pkg")
    assert listed_images(images) == [site.resolve() / n for n in names[:2]]
    assert list(image_hashes(images).values()) == [str(site.resolve() / n) for n in names[:2]]
    labelled = LabelledImagesSet(name="labelled", path="labelled.csv", package="photo-pkg")
    data = load(labelled, [])
    assert data.inputs == [str(site.resolve() / names[2])] and data.score(_onehot([3])) == 100.0
    calib = ImageSource(path="eval.csv", format="csv", package="photo-pkg")
    assert list_images(calib) == [site.resolve() / n for n in names[:2]]

    with pytest.raises(InputError, match=r"image package 'gone-pkg' is not installed; `pip install gone-pkg`"):
        list_images(ImageSource(path="eval.csv", format="csv", package="gone-pkg"))
    pd.DataFrame({"path": ["photo_pkg/data/missing.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match=r"missing.png not found .*\(relative to package photo-pkg\)"):
        listed_images(ImagesSet(name="bad", path="bad.csv", reader="csv", package="photo-pkg"))
    with pytest.raises(ValidationError, match="package 'photo-pkg' needs reader: csv"):
        ImagesSet(name="f", path="photos", package="photo-pkg")
    with pytest.raises(ValidationError, match="package 'photo-pkg' needs format: csv"):
        ImageSource(path="photos", format="folder", package="photo-pkg")
