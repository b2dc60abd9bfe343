"""ONNX graph helpers written once: loading with a one-line error, consumers/producers, constants,
model input specs (ONNX file, OpenVINO IR, ModelProto, ONNX Runtime session) and cosine agreement."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.errors import InputError


def load_model(path: Path, *, check: bool = False, weights: bool = True, hint: str = "re-run the stage that wrote it"):
    """The ModelProto at `path` (weights left out with `weights=False`); InputError naming the file if it
    is missing, truncated or not ONNX. `check` also runs onnx.checker."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ONNX model not found; {hint}")
    try:
        proto = onnx.load(str(path), load_external_data=weights)
        if check:
            onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf DecodeError, checker errors, external data errors ...
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise InputError(f"{path}: not a valid ONNX model ({exc.__class__.__name__}: {detail}); {hint}") from exc
    if not proto.graph.node or not proto.graph.input:
        raise InputError(f"{path}: not an ONNX model (no nodes or inputs); {hint}")
    return proto


def consumers(graph) -> dict[str, list[tuple[Any, int]]]:
    """Tensor name -> (node, input index) of every node reading it."""
    out: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                out.setdefault(name, []).append((node, i))
    return out


def producers(graph) -> dict[str, Any]:
    """Tensor name -> the node writing it."""
    return {out: node for node in graph.node for out in node.output}


def constants(graph) -> set[str]:
    """Initializers, and the Identity outputs exporters use to tie a weight to another."""
    names = {i.name for i in graph.initializer}
    return names | {n.output[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in names}


def initializers(graph) -> Callable[[str], Any]:
    """`lookup(name)`: the initializer behind a tensor name, also through the Identity exporters use to tie a
    weight to another; None for an activation."""
    inits = {i.name: i for i in graph.initializer}
    tied = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    return lambda name: inits.get(tied.get(name, name))


def drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy scalar type, shape (None where dynamic)."""

    name: str
    dtype: type
    shape: tuple[int | None, ...]

    @property
    def static(self) -> bool:
        return all(d is not None and d > 0 for d in self.shape)


_ORT_TYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
}


def ort_type(type_str: str) -> type:
    if type_str not in _ORT_TYPES:
        raise InputError(f"model input type {type_str} is not supported (supported: {', '.join(_ORT_TYPES)})")
    return _ORT_TYPES[type_str]


def port_name(port) -> str:
    """An OpenVINO port's name as the model's users call it: converters may give a tensor numeric aliases too (e.g.
    {"24", "attention_mask"}); the first non-numeric name, else the port's any-name."""
    names = sorted(port.get_names(), key=lambda n: (n.isdigit(), n))
    return names[0] if names else port.get_any_name()


def input_specs(source) -> tuple[list[InputSpec], dict[str, str]]:
    """The declared inputs of a model and its metadata, from an ONNX or OpenVINO IR path, a ModelProto,
    an onnxruntime InferenceSession or a list of NodeArg-like objects (.name, .type, .shape)."""
    import onnx

    if isinstance(source, (str, Path)) and Path(source).suffix == ".xml":
        import openvino as ov

        ports = ov.Core().read_model(str(source)).inputs
        specs = [
            InputSpec(port_name(p), np.dtype(p.get_element_type().to_dtype()).type,
                      tuple(d.get_length() if d.is_static else None for d in p.get_partial_shape()))
            for p in ports
        ]
        return specs, {}
    if isinstance(source, (str, Path)):
        source = load_model(Path(source), weights=False)
    if isinstance(source, onnx.ModelProto):
        meta = {p.key: p.value for p in source.metadata_props}
        inits = {i.name for i in source.graph.initializer}
        specs = []
        for i in source.graph.input:
            if i.name in inits:
                continue
            tt = i.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            specs.append(InputSpec(i.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).type, shape))
        return specs, meta
    meta = {}
    if hasattr(source, "get_inputs"):  # onnxruntime.InferenceSession
        meta = dict(source.get_modelmeta().custom_metadata_map)
        source = source.get_inputs()
    specs = [InputSpec(a.name, ort_type(a.type), tuple(d if isinstance(d, int) else None for d in a.shape))
             for a in source]
    return specs, meta


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two tensors flattened (1.0 for two all-zero tensors that are equal)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b` ([N, D] each), in the arrays' own precision; a row that is
    all zero on one side only scores 0 (its signal is gone), on both sides 1, as in `cosine`."""
    dots, denoms = np.sum(a * b, axis=1), np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    equal = np.all(a == b, axis=1).astype(dots.dtype)
    return np.divide(dots, denoms, out=equal, where=denoms > 0)
