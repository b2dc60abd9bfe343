"""Image sources: folders and CSVs of paths, reading (EXIF, RGB, one line per bad file), content hashes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.core.errors import InputError
from tasks.data.images import ImageSource, image_sha256, list_images, read_image


def _image(path, size=(12, 8), mode="RGB", seed=0, **save):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, **save)
    return path


def test_a_folder_lists_images_sorted_recursively_and_skips_other_files(tmp_path):
    _image(tmp_path / "imgs" / "b.png")
    _image(tmp_path / "imgs" / "a.JPG", seed=1)
    _image(tmp_path / "imgs" / "sub" / "c.jpeg", seed=2)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    source = ImageSource(path=tmp_path / "imgs", format="folder")
    assert [p.name for p in list_images(source)] == ["a.JPG", "b.png", "c.jpeg"]
    flat = ImageSource(path=tmp_path / "imgs", format="folder", recursive=False)
    assert [p.name for p in list_images(flat)] == ["a.JPG", "b.png"]


def test_a_csv_lists_paths_relative_to_the_project_root(tmp_path):
    _image(tmp_path / "data" / "x.png")
    _image(tmp_path / "elsewhere" / "y.png", seed=3)
    csv = tmp_path / "data" / "list.csv"
    pd.DataFrame({"file": ["data/x.png", str(tmp_path / "elsewhere" / "y.png"), ""]}).to_csv(csv, index=False)
    source = ImageSource(path="data/list.csv", format="csv", column="file")
    assert list_images(source, root=tmp_path) == [tmp_path / "data" / "x.png", tmp_path / "elsewhere" / "y.png"]
    with pytest.raises(InputError, match=r"list.csv: no column 'path'"):
        list_images(ImageSource(path=csv, format="csv"))


def test_empty_sources_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no .*files; point the image source at images"):
        list_images(ImageSource(path=tmp_path / "empty", format="folder"))
    with pytest.raises(InputError, match=r"missing: image folder not found"):
        list_images(ImageSource(path=tmp_path / "missing", format="folder"))


def test_reading_applies_exif_orientation_and_converts_to_rgb(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = _image(tmp_path / "rotated.jpg", size=(12, 8), exif=exif)
    image = read_image(rotated)
    assert image.mode == "RGB" and image.size == (8, 12)
    grey = read_image(_image(tmp_path / "grey.png", mode="L"))
    assert grey.mode == "RGB" and np.array_equal(np.asarray(grey)[..., 0], np.asarray(grey)[..., 2])
    assert read_image(_image(tmp_path / "palette.png", mode="P")).mode == "RGB"


def test_bad_images_stop_with_one_line_naming_the_file(tmp_path):
    with pytest.raises(InputError, match=r"gone.png: image not found"):
        read_image(tmp_path / "gone.png")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(InputError, match=r"text.jpg: not an image PIL can read"):
        read_image(tmp_path / "text.jpg")
    whole = _image(tmp_path / "whole.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"cut.png: cannot decode the image"):
        read_image(tmp_path / "cut.png")
    _image(tmp_path / "cmyk.jpg", mode="CMYK")
    with pytest.raises(InputError, match=r"cmyk.jpg: pixel format CMYK is not 8-bit RGB"):
        read_image(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((4, 4), 4000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(InputError, match=r"deep.png: pixel format I;16"):
        read_image(tmp_path / "deep.png")
    with pytest.raises(InputError) as caught:
        read_image(tmp_path / "cut.png")
    assert "\n" not in str(caught.value)


def test_the_same_bytes_under_two_names_have_one_hash(tmp_path):
    first = _image(tmp_path / "one.png")
    (tmp_path / "copy.png").write_bytes(first.read_bytes())
    other = _image(tmp_path / "two.png", seed=9)
    assert image_sha256(first) == image_sha256(tmp_path / "copy.png") != image_sha256(other)
    assert len(image_sha256(first)) == 64
