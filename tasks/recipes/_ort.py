"""What the ONNX Runtime recipes share: the calibration reader, quantization types, pre-processing, overrides."""

from __future__ import annotations

import fnmatch
from collections import Counter
from pathlib import Path

import numpy as np

from tasks.core.errors import InputError
from tasks.recipes.base import row, rows


class NpzReader:
    """CalibrationDataReader over in-memory rows; set_range lets ORT calibrate chunk by chunk."""

    def __init__(self, feeds: dict[str, np.ndarray]):
        self.feeds = feeds
        self.start, self.end = 0, rows(feeds)
        self.pos = self.start

    def __len__(self) -> int:
        return rows(self.feeds)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.end:
            return None
        i, self.pos = self.pos, self.pos + 1
        return row(self.feeds, i)

    def rewind(self) -> None:
        self.pos = self.start

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self))
        self.pos = self.start


def chunk(n_rows: int, limit: int) -> int:
    """The largest chunk <= limit that divides n_rows (ORT's strided calibration needs a divisor)."""
    return max(d for d in range(1, min(n_rows, limit) + 1) if n_rows % d == 0)



_QTYPES = {"uint8": "QUInt8", "int8": "QInt8", "uint16": "QUInt16", "int16": "QInt16"}


def qtype(name: str):
    from onnxruntime.quantization import QuantType

    return getattr(QuantType, _QTYPES[name])


def ort_preprocess(model: Path, tmp: Path) -> Path:
    """ORT's pre-processing for quantization: shape inference + basic optimisation (e.g. MatMul + Add -> Gemm)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "preprocessed.onnx"
    # The symbolic shape pass crashes on this export's mask subgraph; ONNX shape inference suffices
    # because every shape is static.
    quant_pre_process(str(model), str(out), skip_symbolic_shape=True)
    return out


def node_names(graph, patterns: list[str], setting: str, where: str) -> list[str]:
    """The graph's node names that a setting's entries (`nodes_to_exclude`, `activations_8bit`) name: exact names
    or shell-style patterns (`*/intermediate/dense/*`: every FFN input layer; `*` also matches `/`), since ORT's
    pre-processing renames fused nodes. Each entry must match a node."""
    names = [n.name for n in graph.node]
    found: list[str] = []
    for pattern in patterns:
        found.extend(name for name in _matching(names, pattern, setting, "node", where) if name not in found)
    return found


def _matching(names: list[str], pattern: str, setting: str, kind: str, where: str) -> list[str]:
    """The names a params entry means: itself when it is one (a name may hold `[`), else those its shell-style
    pattern matches; none is an InputError naming the setting."""
    matched = [pattern] if pattern in names else fnmatch.filter(names, pattern)
    if not matched:
        raise InputError(f"{where}: {setting} {pattern!r} matches no {kind} of the pre-processed graph; "
                         "fix the name or pattern")
    return matched


def preprocess(model: Path, tmp: Path, settings) -> tuple[Path, list[str]]:
    """ORT's pre-processing (`ort_preprocess`), then check names from params; returns the pre-processed model
    and the node names `nodes_to_exclude` matches there."""
    import onnx

    out = ort_preprocess(model, tmp)
    graph = onnx.load(str(out), load_external_data=False).graph
    where = f"quantize.variants ({settings.method})"
    excluded = node_names(graph, list(settings.nodes_to_exclude), "nodes_to_exclude", where)
    present = {n.op_type for n in graph.node}
    if settings.op_types is not None and not set(settings.op_types) & present:
        raise InputError(f"{where}: none of op_types {settings.op_types} occurs in {model}; fix op_types")
    return out, excluded


def tensor_names(graph, patterns: list[str], where: str) -> dict[str, list[str]]:
    """Each `tensor_overrides` key's tensors in the graph: an exact name or a shell-style pattern
    (`*/intermediate_act_fn/Mul_1_output_0`: every FFN activation output). Each key must match a tensor."""
    names = sorted({t for n in graph.node for t in (*n.input, *n.output) if t} | {i.name for i in graph.initializer})
    return {pattern: _matching(names, pattern, "tensor_overrides", "tensor", where) for pattern in patterns}


def tensor_overrides(overrides: dict[str, dict], graph) -> dict[str, list[dict]]:
    """ORT's TensorQuantOverrides from params (keys may be patterns, see `tensor_names`), values checked."""
    fixed = {}
    matched = tensor_names(graph, list(overrides), "quantize.variants (ort_static)")
    for tensor, values in overrides.items():
        entry = dict(values)
        if "quant_type" in entry:
            if entry["quant_type"] not in _QTYPES:
                raise InputError(
                    f"quantize.variants: tensor_overrides[{tensor!r}].quant_type {entry['quant_type']!r} "
                    f"unknown; use one of {sorted(_QTYPES)}"
                )
            entry["quant_type"] = qtype(entry["quant_type"])
        if ("rmin" in entry) != ("rmax" in entry):
            raise InputError(f"quantize.variants: tensor_overrides[{tensor!r}] needs both rmin and rmax")
        for bound in ("rmin", "rmax"):  # ORT needs numpy scalars here, not Python floats
            if bound in entry:
                entry[bound] = np.float32(entry[bound])
        for name in matched[tensor]:
            fixed[name] = [dict(entry)]
    return fixed


def lowered_node_overrides(model, nodes: set[str], lower, default) -> dict[str, dict]:
    """TensorQuantOverrides that run exactly `nodes` at activation type `lower` in a `default`-typed QDQ graph.

    Each float activation a node reads from outside the set keeps its producer's type and is converted to `lower`
    on that edge only; each one it writes is produced at `lower` and converted back for readers outside the set.
    ORT's mixed-precision fixer works per tensor instead: lowering a linear layer's input lowers its producer and
    every reader too, so a LayerNorm feeding a Q/K/V projection took its input, BERT's residual sum with its
    outlier channels, at 8 bits (MiniLM: cosine 0.98 to fp32 with one block's Q/K/V lowered, against 0.9994)."""
    from onnx import TensorProto, shape_inference

    graph = shape_inference.infer_shapes(model).graph
    floats = {v.name for v in (*graph.value_info, *graph.input, *graph.output)
              if v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    weights = {i.name for i in graph.initializer}
    producer = {t: n.name for n in graph.node for t in n.output}
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, set()).add(node.name)
    overrides: dict[str, dict] = {}
    for node in graph.node:
        if node.name not in nodes:
            continue
        for t in node.output:
            outside = readers.get(t, set()) - nodes
            overrides[t] = {"quant_type": lower, **({"convert": {"quant_type": default, "recv_nodes": outside}}
                                                     if outside else {})}
        for t in node.input:
            if t in floats and t not in weights and producer.get(t) not in nodes:
                convert = overrides.setdefault(t, {"quant_type": default, "convert": {"quant_type": lower,
                                                                                      "recv_nodes": set()}})["convert"]
                convert["recv_nodes"].add(node.name)
    return overrides


def is16(qtype) -> bool:
    return qtype is not None and "16" in str(getattr(qtype, "name", qtype))


def onnx_quant_counts(path: Path) -> dict[str, int]:
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {
        "quantize_linear_nodes": ops["QuantizeLinear"],
        "dequantize_linear_nodes": ops["DequantizeLinear"],
        "dynamic_quantize_nodes": ops["DynamicQuantizeLinear"] + ops["DynamicQuantizeMatMul"] + ops["MatMulInteger"],
    }


