"""Plain-PyTorch models whose architecture is a callable of an installed package (`module:attr.attr`, called with
keyword arguments) and whose weights are a state dict: the folder fetch_model writes for `source: torch_package`
and what a family loads from it.

The folder holds `model.safetensors` and a `config.json` naming the architecture:
`{"model_type": "edgeopt_torch", "architecture": "efficientnet_lite_pytorch:EfficientNet.from_name",
"architecture_args": {"model_name": "efficientnet-lite0"}, "shape_multiple": 32, ...}`. Building the model
imports that module, which runs its code: params name it explicitly (`fetch_model.architecture`, trusted with
`fetch_model.trust_remote_code: true`). Weights are loaded strictly: every key and shape must match.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks.core.errors import InputError

MODEL_TYPE = "edgeopt_torch"
WEIGHTS = "model.safetensors"


def architecture_callable(spec: str, where: str):
    """The callable `module:attr.attr` names; InputError (one line) when its module is not installed."""
    module_name, _, attrs = spec.partition(":")
    if not module_name or not attrs:
        raise InputError(f"{where}: {spec!r} is not 'module:callable' (e.g. efficientnet_lite_pytorch:EfficientNet.from_name)")
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        dist = module_name.split(".")[0].replace("_", "-")
        raise InputError(f"{where}: module {exc.name!r} is not installed; `pip install {dist}` "
                         "(or the project extra that pins it, e.g. pip install -e '.[lite0]')") from exc
    try:
        for attr in attrs.split("."):
            target = getattr(target, attr)
    except AttributeError as exc:
        raise InputError(f"{where}: {module_name} has no {attrs}; fix the architecture name") from exc
    if not callable(target):
        raise InputError(f"{where}: {spec} is not callable; name a class or function that builds the model")
    return target


def architecture_distributions(spec: str) -> list[str]:
    """The installed distributions providing the architecture's top-level module (their versions are what the
    built model depends on besides its weights); [] when it is not installed."""
    return sorted(metadata.packages_distributions().get(spec.partition(":")[0].split(".")[0], []))


def build(architecture: str, args: dict[str, Any], where: str):
    """The model the architecture callable builds from `args`, in eval mode."""
    import torch

    try:
        model = architecture_callable(architecture, where)(**args)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise InputError(f"{where}: {architecture}(**{args}) failed ({exc.__class__.__name__}: {str(exc)[:120]}); "
                         "fix the architecture arguments") from exc
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{where}: {architecture} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def check_state_dict(model, state: Any, path: Path) -> None:
    """One line naming the first difference between a state dict and the model's own (keys, shapes)."""
    import torch

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict (a mapping of names to tensors); point the weights at one")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of other shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} vs "
                 f"{tuple(own[shapes[0]].shape)})" if shapes else ""]
        raise InputError(f"{path}: weights do not fit the architecture: {', '.join(p for p in parts if p)}; "
                         "use the weights made for these architecture arguments")


def check_config(config: dict, path: Path) -> None:
    if not isinstance(config.get("architecture"), str) or not isinstance(config.get("architecture_args", {}), dict):
        raise InputError(f"{path}: an {MODEL_TYPE} config needs 'architecture' (module:callable) and "
                         "'architecture_args' (an object); fetch the model again")


def load_folder(folder: Path, config: dict, reshape=None):
    """The model of a torch_package folder: built from its config, weights loaded strictly (eval mode).
    `reshape(model)`: changes the built model's shapes before the weights load (a pruned folder's channels)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    check_config(config, folder / "config.json")
    model = build(config["architecture"], config.get("architecture_args", {}), f"{folder / 'config.json'}")
    if reshape is not None:
        reshape(model)
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{folder / WEIGHTS}: not a readable safetensors file ({str(exc)[:120]}); fetch the model again") from exc
    check_state_dict(model, state, folder / WEIGHTS)
    model.load_state_dict(state, strict=True)
    return model.eval()
