"""Stage fetch_model: resolve the model source and copy a safe, self-contained HF folder.

Reads: a Hugging Face model folder (from an installed package, a local path, or the hub at a
pinned revision). Writes: `<out>/model/` (config, tokenizer files, safetensors weights) and
`<out>/stage.json` with the weights' sha256.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

from tasks.catalog import model_folder
from tasks.config import SUPPORTED_MODEL_TYPES, FetchModelParams
from tasks.errors import InputError
from tasks.fingerprint import atomic_output_dir, file_sha256, write_stamp

TOOLS = ("transformers",)
_WEIGHTS_SAFE = "model.safetensors"
_WEIGHTS_PICKLE = "pytorch_model.bin"
# Everything a tokenizer and config need; nothing executable (no *.py, which remote code would load).
_COPY_SUFFIXES = {".json", ".txt", ".model", ".safetensors"}


def resolve_source(params: FetchModelParams) -> Path:
    """Return the local folder the params point at, downloading only for `source: hub`."""
    if params.source == "package":
        return _package_model_dir(params.package)
    if params.source == "path":
        folder = Path(params.path).expanduser()
        if not folder.is_dir():
            raise InputError(f"fetch_model.path: {folder} does not exist or is not a folder")
        return folder
    return _hub_snapshot(params.hub_id, params.revision)


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


def _hub_snapshot(hub_id: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(hub_id, revision=revision, allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"])
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise InputError(
            f"fetch_model.hub_id: cannot download {hub_id}@{revision} ({exc.__class__.__name__}); "
            "this machine may be offline: use source: path with a local copy"
        ) from exc


def _check_folder(folder: Path, params: FetchModelParams) -> Path:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{config_path}: not valid JSON") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{config_path}: model_type {model_type!r} is not a supported encoder; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    if config.get("auto_map") and not params.trust_remote_code:
        raise InputError(
            f"{config_path}: the model needs remote code (auto_map); set fetch_model.trust_remote_code: true only if you trust it"
        )
    if (folder / _WEIGHTS_SAFE).is_file():
        return folder / _WEIGHTS_SAFE
    if (folder / _WEIGHTS_PICKLE).is_file():
        if not params.allow_pickle:
            raise InputError(
                f"{folder}: weights only as {_WEIGHTS_PICKLE} (pickle, can run code); "
                "convert to safetensors or set fetch_model.allow_pickle: true"
            )
        return folder / _WEIGHTS_PICKLE
    raise InputError(f"{folder}: no weights ({_WEIGHTS_SAFE}); sharded or other formats are not supported")


def run(source_dir: Path, params: FetchModelParams, out_dir: Path, key: str) -> dict:
    """Copy the model folder's config, tokenizer and weights into `out_dir/model`."""
    weights = _check_folder(Path(source_dir), params)
    with atomic_output_dir(out_dir) as scratch:
        dest = model_folder(scratch)
        dest.mkdir()
        for item in sorted(Path(source_dir).iterdir()):
            if item.is_file() and (item.suffix in _COPY_SUFFIXES or item.name == weights.name):
                shutil.copy2(item, dest / item.name)
        config = json.loads((dest / "config.json").read_text(encoding="utf-8"))
        payload = {
            "model_type": config["model_type"],
            "max_position_embeddings": config.get("max_position_embeddings"),
            "weights": weights.name,
            "weights_sha256": file_sha256(dest / weights.name),
            "source": params.source,
        }
        write_stamp(scratch, key, payload)
    return payload
