"""Image sources named in params (calibration images, evaluation images): listing, reading, content hashes.

A source is a folder (every image file under it, sorted by relative path) or a CSV with a column of image
paths. Paths in params and in a CSV are relative to the project root (or absolute); with `package` set, a CSV's
paths are relative to that installed distribution's root instead (found with importlib.metadata; the package is
never imported), so a committed CSV can name photos a registry package ships without copying them. Reading applies the
EXIF orientation and converts to RGB; a missing, truncated or unreadable file, or a pixel format an RGB
model cannot take (CMYK, 16-bit, float), stops with a one-line `InputError` naming the file. Images are
compared by the sha256 of their bytes (`image_sha256`), never by path: the same photo under two names is
the same image.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.core.errors import InputError
from tasks.core.fingerprint import file_sha256
from tasks.core.params import StrictParams
from tasks.data.text import read_table

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Pixel formats converted to RGB as is (palette, grey, with alpha): 8 bits per channel.
_CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1"}


class ImageSource(StrictParams):
    path: Path = Field(description="folder of images, or CSV of image paths; relative to the project root")
    format: Literal["folder", "csv"] = Field(description="folder: every image under `path`; csv: the `column` of paths")
    column: str = Field("path", description="csv: the column holding image paths (relative to the project root)")
    recursive: bool = Field(True, description="folder: include images in sub-folders")
    extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, min_length=1, description="folder: file suffixes read")
    provenance: str | None = Field(None, description="where the images come from and their licence (recorded)")
    package: str | None = Field(None, description="csv: the installed distribution the paths are relative to "
                                "(e.g. ai-benchmark; never imported)")

    @model_validator(mode="after")
    def _extensions(self) -> ImageSource:
        bad = [e for e in self.extensions if not e.startswith(".") or e != e.lower()]
        if bad:
            raise ValueError(f"{self.path}: extensions {bad} must be lower-case suffixes with a dot, e.g. .jpg")
        if self.package and self.format != "csv":
            raise ValueError(f"{self.path}: package {self.package!r} needs format: csv (a CSV of paths inside it)")
        return self

    def image_root(self, root: Path | None = None) -> Path | None:
        """What the CSV's paths are relative to: the package's root, else the project root."""
        return package_root(self.package) if self.package else root


def package_root(package: str) -> Path:
    """The folder an installed distribution's files are relative to (its metadata only; never imported)."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        raise InputError(f"image package {package!r} is not installed; `pip install {package}` (or the project "
                         "extra that pins it, e.g. pip install -e '.[lite0]')") from exc
    return Path(dist.locate_file("")).resolve()


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """A path from params or a CSV: absolute as is, otherwise relative to the project root (`root`; None: left
    relative, to the working directory, which is the project root when stages run)."""
    path = Path(path)
    return path if path.is_absolute() or root is None else root / path


def list_folder(folder: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, recursive: bool = True) -> list[Path]:
    """Image files under `folder` (by suffix, case-insensitive), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: image folder not found; fix its path in params.yaml")
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in found if p.is_file() and p.suffix.lower() in extensions),
                  key=lambda p: p.relative_to(folder).as_posix())


def list_csv(path: Path, column: str, root: Path | None = None) -> list[Path]:
    """The image paths of a CSV column (blank rows skipped), resolved against the project root."""
    values = read_table(Path(path), "csv", [column], "image list")[column].str.strip()
    return [resolve(v, root) for v in values if v]


def list_images(source: ImageSource, path: Path | None = None, root: Path | None = None) -> list[Path]:
    """Every image of a source, in source order (`path`: the source's resolved path, default `source.path`);
    InputError when it holds none."""
    path = Path(path) if path is not None else resolve(source.path, root)
    if source.format == "folder":
        images = list_folder(path, source.extensions, source.recursive)
    else:
        images = list_csv(path, source.column, source.image_root(root))
    if not images:
        what = f"no {'/'.join(source.extensions)} files" if source.format == "folder" else f"no paths in column {source.column!r}"
        raise InputError(f"{path}: {what}; point the image source at images")
    return images


def listed_images(source: ImageSource, root: Path | None = None) -> list[Path]:
    """The images a CSV source names, each of which must exist (a folder's own hash covers its images, a CSV's
    does not: what a stage's cache key must also hash); [] for a folder."""
    if source.format == "folder":
        return []
    images = list_csv(resolve(source.path, root), source.column, source.image_root(root))
    missing = [p for p in images if not p.is_file()]
    if missing:
        relative = f"to package {source.package}" if source.package else "to the project root"
        raise InputError(f"{source.path}: image {missing[0]} not found (+{len(missing) - 1} more); fix the paths "
                         f"(relative {relative}) or remove the rows")
    return images


def read_image(path: Path):
    """The image as an RGB PIL image, EXIF orientation applied; InputError naming the file otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image not found; fix the path (relative to the project root) or remove it")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in _CONVERTIBLE_MODES:
                raise InputError(f"{path}: pixel format {image.mode} is not 8-bit RGB, grey or palette; re-save the "
                                 "image as 8-bit RGB (JPEG or PNG)")
            return ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not an image PIL can read; remove it or re-save it as JPEG or PNG") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InputError(f"{path}: cannot decode the image ({first[:120]}); remove it or re-save it") from exc


def image_sha256(path: Path) -> str:
    """The sha256 of the image file's bytes (what makes two images the same)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image not found; fix the path (relative to the project root) or remove it")
    return file_sha256(path)
