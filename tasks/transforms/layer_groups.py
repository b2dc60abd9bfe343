"""The linear layers of a graph, grouped by the module that made them: the unit a per-layer precision choice
(sensitivity, mixed precision) is made for.

A linear layer is a MatMul or Gemm whose second input is a weight (an initializer, also through an exporter's
Identity). Exporters name nodes after the module path (`/encoder/layer.0/attention/self/query/MatMul`), and
the quantization recipes' graph rewrites keep that prefix (`.../MatMul/flatten`), so a group is named by its
module path and selected in `nodes_to_exclude` by the pattern `<module path>/*`. Sibling projections a family
names together (attention's query, key and value) form one group.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.core.onnx_graph import initializers


@dataclass(frozen=True)
class LayerGroup:
    name: str
    """The module path, or `<parent>/<a>+<b>+<c>` for fused siblings."""
    nodes: tuple[str, ...]
    """The linear nodes (MatMul / Gemm) in it."""
    patterns: tuple[str, ...]
    """`nodes_to_exclude` entries that select every node of its modules (the layer, its bias Add, rewrites)."""
    macs: int
    """Multiply-accumulates of its linear nodes per inference (the latency cost a precision choice weighs)."""


def _module(node_name: str) -> str:
    return node_name.rsplit("/", 1)[0] if "/" in node_name.strip("/") else node_name


def linear_layer_groups(model: Path, fused_siblings: Iterable[frozenset[str]] = ()) -> list[LayerGroup]:
    """The groups of `model`'s linear layers in graph order; `fused_siblings`: sets of module names that share
    a parent and form one group when all present (e.g. {query, key, value})."""
    import onnx
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(onnx.load(str(model))).graph
    initializer = initializers(graph)
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
              for info in (*graph.value_info, *graph.input)}
    # Rows a layer multiplies: its input's leading dims; where shape inference left them unknown, the tokens of
    # the model's first input (every linear layer of an encoder runs once per token).
    first = [d for d in shapes.get(graph.input[0].name, []) if d > 0] if graph.input else []
    default_rows = int(np.prod(first)) if first else 1
    layers: dict[str, list[tuple[str, int]]] = {}  # module -> [(node, macs)]
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = initializer(node.input[1])
        if weight is None or len(weight.dims) != 2:
            continue
        leading = shapes.get(node.input[0], [])[:-1]
        rows = int(np.prod(leading)) if leading and all(d > 0 for d in leading) else default_rows
        layers.setdefault(_module(node.name), []).append((node.name, rows * int(np.prod(weight.dims))))
    group_of = {m: m for m in layers}
    for siblings in fused_siblings:
        by_parent: dict[str, list[str]] = {}
        for module in layers:
            parent, _, leaf = module.rpartition("/")
            if leaf in siblings:
                by_parent.setdefault(parent, []).append(module)
        for parent, modules in by_parent.items():
            if len(modules) == len(siblings):  # all of them present: one group
                for module in modules:
                    group_of[module] = f"{parent}/" + "+".join(m.rpartition("/")[2] for m in modules)
    members: dict[str, list[str]] = {}
    for module in layers:  # graph order, by each group's first module
        members.setdefault(group_of[module], []).append(module)

    def patterns(module: str) -> list[str]:
        names = [n for n, _ in layers[module]]
        return [f"{module}/*"] if all(n.startswith(f"{module}/") for n in names) else names

    return [
        LayerGroup(name, tuple(n for m in modules for n, _ in layers[m]),
                   tuple(p for m in modules for p in patterns(m)), sum(c for m in modules for _, c in layers[m]))
        for name, modules in members.items()
    ]
