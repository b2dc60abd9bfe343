"""Graph facts of transformer encoders that quantization recipes use (`QuantizationHints`).

BERT-class encoders carry a few huge channels in the residual stream: the LayerNorm inputs (residual sums)
deserve a wider type than other activations (`residual_tensors`), and each LayerNorm output's outlier
channels can be moved into the next weights before quantizing (`smooth_layernorm_outputs`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.core.onnx_graph import drop_unused_initializers, initializers
from tasks.core.onnx_graph import producers as producers_of
from tasks.transforms.layer_groups import LayerGroup, linear_layer_groups


class TransformerGraphHints:
    """`QuantizationHints` of every transformer family (LayerNorm after each residual Add)."""

    def residual_tensors(self, graph) -> list[str]:
        return residual_tensors(graph)

    def smooth_outliers(self, model: Path, out: Path, feeds: dict[str, np.ndarray], alpha: float, rows: int) -> int:
        return smooth_layernorm_outputs(model, out, feeds, alpha, rows)

    def layer_groups(self, model: Path) -> list[LayerGroup]:
        return linear_layer_groups(model, ATTENTION_PROJECTIONS)


ATTENTION_PROJECTIONS = (
    frozenset({"query", "key", "value"}),  # BERT, RoBERTa, XLM-R, ELECTRA
    frozenset({"q", "k", "v"}),  # MPNet
    frozenset({"q_lin", "k_lin", "v_lin"}),  # DistilBERT
    frozenset({"q_proj", "k_proj", "v_proj"}),
)
"""Module names of attention's input projections, which read the same tensor: one group per layer."""


def residual_tensors(graph) -> list[str]:
    """Tensors of the residual stream at each LayerNormalization: its input and the branch added in.

    For LN(Add(branch, skip)) this returns the Add output and the branch output (through Reshape and
    a bias Add back to the MatMul/Gemm that made it); a skip input that is another LN's output is left
    alone, as is anything that is not an activation produced by Add/MatMul/Gemm.
    """
    producers = producers_of(graph)
    initializers = {i.name for i in graph.initializer}
    marked: list[str] = []

    def mark(name: str) -> None:
        if name not in marked:
            marked.append(name)

    def branch(name: str) -> None:
        node = producers.get(name)
        while node is not None and node.op_type == "Reshape":  # ORT's MatMul+Add -> Gemm fusion adds Reshapes
            mark(name)
            name = node.input[0]
            node = producers.get(name)
        if node is None or node.op_type not in ("Add", "MatMul", "Gemm", "Mul"):
            return
        mark(name)
        if node.op_type == "Add" and any(i in initializers for i in node.input):  # bias add: MatMul before it
            inner = next(i for i in node.input if i not in initializers)
            if producers.get(inner) is not None and producers[inner].op_type in ("MatMul", "Gemm"):
                mark(inner)

    for node in graph.node:
        if node.op_type != "LayerNormalization":
            continue
        x = node.input[0]
        mark(x)
        add = producers.get(x)
        if add is None or add.op_type != "Add":
            continue
        for name in add.input:
            src = producers.get(name)
            if name in initializers or src is None or src.op_type in ("LayerNormalization", "Gather"):
                continue
            branch(name)
    return marked


def smooth_layernorm_outputs(model: Path, out: Path, feeds: dict[str, np.ndarray], alpha: float, rows: int) -> int:
    """Move LayerNorm-output outlier channels into the weights of the MatMuls that read them.

    BERT's residual stream carries a few huge channels, so each LayerNorm output holds a channel near
    sqrt(hidden) * gamma (e.g. 28 where the rest sit within +-6) and an 8-bit per-tensor scale spends
    its levels on it. Per channel j, with s_j = max|Y_j|^alpha / max|W_j|^(1-alpha) (normalised to the
    median, never below 1): gamma_j, beta_j /= s_j; row j of every consuming weight *= s_j; and the
    residual skip path gets Mul(s) so the sum is unchanged. Exact in float; returns how many
    LayerNorms were smoothed (those read only by MatMul/Gemm weights and residual Adds).
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    proto = onnx.load(str(model))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    initializer = initializers(graph)

    def _const(name):  # an initializer's value, also behind the Identity nodes exporters use for tied weights
        tensor = initializer(name)
        return numpy_helper.to_array(tensor) if tensor is not None else None

    def _private(node, k: int, value: np.ndarray, suffix: str) -> None:  # node.input[k] := a fresh initializer
        # The suffix names the node: exporters deduplicate equal tensors, so two LayerNorms may share a gamma.
        name = f"{node.input[k]}/{suffix}"
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        node.input[k] = name

    def readers(name):  # consumers of `name`, looking through Reshape (ORT's Gemm fusion adds them)
        for node in users.get(name, []):
            if node.op_type == "Reshape":
                yield from users.get(node.output[0], [])
            else:
                yield node

    plans = []
    for ln in (n for n in graph.node if n.op_type == "LayerNormalization"):
        found = list(readers(ln.output[0]))
        mats = [n for n in found if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
        others = [n for n in found if n not in mats]
        if not mats or any(n.op_type != "Add" for n in others) or any(_const(i) is None for i in ln.input[1:] if i):
            continue
        plans.append((ln, mats, others))
    if not plans:
        return 0

    probe = onnx.load(str(model))
    probe.graph.output.extend(helper.make_empty_tensor_value_info(ln.output[0]) for ln, _, _ in plans)
    options = ort.SessionOptions()
    # Unoptimised: ORT's constant folding trips over tied (Identity) weights once LN outputs are graph outputs.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [ln.output[0] for ln, _, _ in plans]
    amax = {name: 0.0 for name in names}
    for i in range(min(rows, len(next(iter(feeds.values()))))):
        outs = session.run(names, {k: v[i : i + 1] for k, v in feeds.items()})
        for name, arr in zip(names, outs, strict=True):
            amax[name] = np.maximum(amax[name], np.abs(arr.reshape(-1, arr.shape[-1])).max(axis=0))

    def weight(node):  # [in, out] view of the weight (Gemm may store it transposed)
        w = numpy_helper.to_array(inits[node.input[1]])
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        return (w.T if transposed else w), transposed

    after = {}
    for ln, mats, others in plans:
        wmax = np.max([np.abs(weight(n)[0]).max(axis=1) for n in mats], axis=0)
        scale = np.asarray(amax[ln.output[0]], dtype=np.float64) ** alpha / np.maximum(wmax, 1e-8) ** (1 - alpha)
        scale = np.clip(scale / np.median(scale), 1.0, None).astype(np.float32)
        # New initializers rather than edits in place: tied/deduplicated weights may be shared.
        for k in (k for k in (1, 2) if k < len(ln.input) and ln.input[k]):
            _private(ln, k, _const(ln.input[k]) / scale, f"smoothed_{ln.name}")
        for node in mats:
            w, transposed = weight(node)
            w = w * scale[:, None]
            _private(node, 1, w.T if transposed else w, f"smoothed_{node.name}")
        scale_name, restored = f"{ln.name}/smooth_scale", f"{ln.output[0]}_unsmoothed"
        graph.initializer.append(numpy_helper.from_array(scale, scale_name))
        for node in others:
            for k, name in enumerate(node.input):
                if name == ln.output[0]:
                    node.input[k] = restored
        after[ln.name] = helper.make_node("Mul", [ln.output[0], scale_name], [restored], name=f"{ln.name}/unsmooth")
    nodes = []
    for node in graph.node:  # keep topological order: each Mul right after its LayerNorm
        nodes.append(node)
        if node.op_type == "LayerNormalization" and node.name in after:
            nodes.append(after[node.name])
    graph.ClearField("node")
    graph.node.extend(nodes)
    drop_unused_initializers(graph)  # the weights the private copies replaced
    onnx.save(proto, str(out))
    return len(plans)
