"""Graph rewrites that make an exported model ready for static quantization and NPUs, each a switchable
`(model, options) -> report` transform (`GraphSurgeryParams`), applied in this order by `apply`:

1. `mask_fill_value` (default -100): the exporter builds the additive attention mask with the
   float32 minimum (-3.4e38). fp32 does not care (exp(-100) is already ~0 next to the real
   scores), but a static quantizer sizes the scale of every tensor on that path from it: the
   score+mask Add gets a uint8 step of ~1e36 and the attention collapses (STS-B Spearman of
   MiniLM QDQ uint8: 38.5 instead of 82). Every float constant or initializer element <= -1e30
   (or -inf, or the dtype minimum) is replaced by the fill value. The value has to be small next
   to the score range, not just finite: -1e4 still gives that Add a step of ~39 (Spearman 40.6
   at seq128), -100 gives ~1 (74.9, the same as leaving the Add and Softmax unquantized); the
   graph_surgery stage's fp32 check guards against a value so small that padding leaks into the attention.
   A model without such constants (a CNN) is left as it is.
2. `float_mask_input`: the int64/bool chain that turns `attention_mask` into the additive bias
   (Cast/Flatten/Gather/And/Expand/Where in transformers 5; Unsqueeze/Cast/Sub/Mul in 4.x
   exports, found by the same search but not tested here) runs on the CPU fallback of most NPUs.
   The chain is found as the nodes computed from `attention_mask` and constants only. The tensor
   added to the attention scores right before Softmax is replaced by a new float32 input
   `attention_bias` [B, 1, 1, L] (0 for real tokens, the fill value for padding; it broadcasts
   over heads and query positions). The mean pooling at the end also reads the mask: its first
   float cast (Unsqueeze -> Cast in our export) is replaced by a float32 input `pooling_mask`
   (1.0 real / 0.0 padding, shape as the cast, e.g. [B, L, 1]). `attention_mask` disappears when
   nothing else reads it; otherwise it is kept and the payload says which nodes still read it.
   The fill value is stored in the model metadata (`tasks.core.feeds.META_FILL`) so
   `tasks.core.feeds.build_feeds` can make the bias.
3. `int32_inputs`: int64 graph inputs become int32. Where every consumer accepts int32 (Gather
   indices, Cast, Shape, or shape-only ops such as Unsqueeze/Reshape leading to those) the input
   is simply retyped; otherwise a Cast to int64 is inserted after the input.
4. `fold_constants` (default on): ONNX Runtime graph optimisation at ORT_ENABLE_BASIC, saved
   offline (constant folding, Identity/Dropout/redundant-Cast elimination, shape folding of the
   static graph), with `MatMulAddFusion` disabled so MatMul+Add are not rewritten to
   Reshape+Gemm+Reshape; unused opset imports are dropped afterwards.
5. `qnn_preprocess`: `onnxruntime.quantization.execution_providers.qnn.qnn_preprocess_model`
   with LayerNorm fusion (fuses the Erf GELU into com.microsoft Gelu, ReduceL2 normalisation into
   LpNormalization where the pattern matches).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from tasks.core.errors import InputError, StageError
from tasks.core.feeds import BIAS_INPUT, MASK_INPUT, META_FILL, POOLING_INPUT, build_feeds
from tasks.core.onnx_graph import consumers as consumers_of
from tasks.core.onnx_graph import cosine
from tasks.core.params import StrictParams

META_PARAMS = "edgeopt.graph_surgery"
HUGE = 1e30
MAX_NAMES = 200  # cap on node names listed per transformation in stage.json

# Consumers for which an int32 tensor is as good as int64.
_INT32_INDEX_INPUT = {"Gather": 1, "GatherElements": 1, "GatherND": 1}
_INT32_SINKS = {"Cast", "Shape", "Size"}
_SHAPE_ONLY = {"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity"}


class GraphSurgeryParams(StrictParams):
    mask_fill_value: float | None = Field(
        -100.0, lt=0, gt=-HUGE, description="replaces the float-min attention-mask fill; null keeps it"
    )
    int32_inputs: bool = Field(False, description="int64 graph inputs become int32")
    float_mask_input: bool = Field(False, description="inputs attention_bias/pooling_mask replace the mask chain")
    fold_constants: bool = Field(True, description="ORT_ENABLE_BASIC offline optimisation (no MatMul+Add->Gemm)")
    qnn_preprocess: bool = Field(False, description="onnxruntime qnn_preprocess_model (Gelu/LayerNorm fusion)")
    verify_min_cosine: float = Field(0.99999, gt=0, le=1)

    @field_validator("mask_fill_value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("mask_fill_value must be a finite negative number such as -100, or null")
        return v


# --------------------------------------------------------------------------- small graph helpers


def _names(nodes: Iterable) -> list[str]:
    names = [n.name or f"<{n.op_type}>" for n in nodes]
    return names[:MAX_NAMES] + ([f"... {len(names) - MAX_NAMES} more"] if len(names) > MAX_NAMES else [])


def _graph_output_names(graph) -> set[str]:
    return {o.name for o in graph.output}


def _remove_dead_nodes(graph) -> list:
    """Drop nodes none of whose outputs is used, then unused initializers; return the removed nodes."""
    removed = []
    keep_outputs = _graph_output_names(graph)
    while True:
        used = {name for node in graph.node for name in node.input} | keep_outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        dead_ids = {id(n) for n in dead}
        kept = [n for n in graph.node if id(n) not in dead_ids]
        removed += dead
        del graph.node[:]
        graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    kept_inits = [i for i in graph.initializer if i.name in used or i.name in keep_outputs]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return removed


def _drop_unused_inputs(graph, names: Iterable[str]) -> list[str]:
    used = {name for node in graph.node for name in node.input} | _graph_output_names(graph)
    dropped = [i.name for i in graph.input if i.name in set(names) and i.name not in used]
    kept = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(kept)
    return dropped


def _tensor_types(model) -> dict[str, tuple[int, list]]:
    """elem_type and static shape of every tensor onnx shape inference can type."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    out = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out[vi.name] = (tt.elem_type, dims)
    for init in model.graph.initializer:
        out[init.name] = (init.data_type, list(init.dims))
    return out


def input_info(graph) -> list[dict]:
    import onnx

    info = []
    for i in graph.input:
        tt = i.type.tensor_type
        info.append(
            {
                "name": i.name,
                "dtype": str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))),
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim],
            }
        )
    return info


# --------------------------------------------------------------------------- 1. mask fill value


def _fill_mask(arr: np.ndarray) -> np.ndarray:
    """Boolean mask of the 'minus infinity' elements of a float array."""
    return np.isneginf(arr) | (arr <= -HUGE) | (arr == np.finfo(arr.dtype).min)


def fix_mask_fill(model, fill: float) -> dict:
    """Replace float-min / -inf elements of every float constant and initializer by `fill`."""
    from onnx import helper, numpy_helper

    changed, old_values = [], set()

    def patch(tensor) -> bool:
        arr = numpy_helper.to_array(tensor)
        if arr.dtype.kind != "f" or arr.size == 0:
            return False
        hit = _fill_mask(arr)
        if not hit.any():
            return False
        old_values.update(float(v) for v in np.unique(arr[hit]))
        new = arr.copy()
        new[hit] = np.asarray(fill, dtype=arr.dtype)
        tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
        return True

    for init in model.graph.initializer:
        if patch(init):
            changed.append(f"initializer:{init.name}")
    for node in model.graph.node:
        for attr in node.attribute:
            hit = False
            if node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.HasField("t"):
                hit = patch(attr.t)
            elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                values = np.asarray([attr.f] if attr.name == "value_float" else list(attr.floats), dtype=np.float32)
                mask = _fill_mask(values)
                if mask.any():
                    old_values.update(float(v) for v in values[mask])
                    values[mask] = fill
                    new = float(values[0]) if attr.name == "value_float" else values.tolist()
                    attr.CopyFrom(helper.make_attribute(attr.name, new))
                    hit = True
            if hit:
                changed.append(node.name or node.output[0])
    return {"fill_value": fill, "replaced_values": sorted(old_values), "count": len(changed), "nodes": changed}


# --------------------------------------------------------------------------- 2. float mask input


def _mask_cone(graph, source: str) -> tuple[list, set[str]]:
    """Nodes whose inputs come only from `source` and constants (and depend on `source`)."""
    const = {i.name for i in graph.initializer} | {""}
    dep = {source}
    cone = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        ins = [x for x in node.input if x]
        if all(x in const for x in ins):
            const.update(node.output)
        elif all(x in const or x in dep for x in ins):
            cone.append(node)
            dep.update(node.output)
    return cone, dep


def _feeds_softmax(tensor: str, consumers, depth: int = 3) -> bool:
    for node, _ in consumers.get(tensor, []):
        if node.op_type == "Softmax":
            return True
        passes_on = node.op_type in ("Add", "Reshape", "Cast", "Sub")
        if depth > 0 and passes_on and _feeds_softmax(node.output[0], consumers, depth - 1):
            return True
    return False


def float_mask_input(model, fill: float) -> dict:
    """Replace the attention-mask chain by float inputs `attention_bias` and `pooling_mask`."""
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    mask_in = next((i for i in graph.input if i.name == MASK_INPUT), None)
    if mask_in is None:
        raise InputError(f"graph_surgery.float_mask_input: the model has no {MASK_INPUT!r} input; disable the option")
    dims = [d.dim_value for d in mask_in.type.tensor_type.shape.dim]
    if len(dims) != 2 or not all(dims):
        raise InputError(
            f"graph_surgery.float_mask_input: {MASK_INPUT} must have a static [batch, seq] shape, got {dims}"
        )
    batch, seq = dims
    types = _tensor_types(model)
    cone, _ = _mask_cone(graph, MASK_INPUT)
    cone_ids = {id(n) for n in cone}
    consumers = consumers_of(graph)

    # The bias: a float tensor of the mask cone added to the attention scores right before Softmax.
    bias_edges = []
    for node in cone:
        for out in node.output:
            if types.get(out, (None,))[0] not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                continue
            for consumer, idx in consumers.get(out, []):
                outside = id(consumer) not in cone_ids
                if outside and consumer.op_type == "Add" and _feeds_softmax(consumer.output[0], consumers):
                    bias_edges.append((consumer, idx, out))
    if not bias_edges:
        raise StageError(
            "graph_surgery.float_mask_input: found no attention-mask tensor added to the scores before a Softmax; "
            "this export is not supported, disable float_mask_input"
        )
    graph.input.append(helper.make_tensor_value_info(BIAS_INPUT, TensorProto.FLOAT, [batch, 1, 1, seq]))
    for consumer, idx, _ in bias_edges:
        consumer.input[idx] = BIAS_INPUT
    removed = _remove_dead_nodes(graph)

    # Pooling: the first float cast of the mask reached through shape-only ops (Unsqueeze -> Cast).
    cone, _ = _mask_cone(graph, MASK_INPUT)
    shape_only = {MASK_INPUT}
    casts = []
    for node in cone:
        if node.op_type in _SHAPE_ONLY and node.input[0] in shape_only:
            shape_only.add(node.output[0])
        elif (
            node.op_type == "Cast"
            and node.input[0] in shape_only
            and helper.get_attribute_value(next(a for a in node.attribute if a.name == "to")) == TensorProto.FLOAT
        ):
            casts.append(node)
    pooling = {"replaced": [], "shape": None}
    shapes = {tuple(types.get(c.output[0], (None, None))[1] or ()) for c in casts}
    if casts and len(shapes) == 1 and all(d for d in next(iter(shapes))):
        shape = list(next(iter(shapes)))
        graph.input.append(helper.make_tensor_value_info(POOLING_INPUT, TensorProto.FLOAT, shape))
        consumers = consumers_of(graph)
        for cast in casts:
            for consumer, idx in consumers.get(cast.output[0], []):
                consumer.input[idx] = POOLING_INPUT
            pooling["replaced"].append(cast.name or cast.output[0])
        pooling["shape"] = shape
        removed += _remove_dead_nodes(graph)
    dropped = _drop_unused_inputs(graph, [MASK_INPUT])
    still = [n.name or n.op_type for n in graph.node if MASK_INPUT in n.input]
    model.metadata_props.append(onnx.StringStringEntryProto(key=META_FILL, value=repr(float(fill))))
    return {
        "bias_input": BIAS_INPUT,
        "bias_replaced_tensors": sorted({t for _, _, t in bias_edges}),
        "bias_consumers": _names(c for c, _, _ in bias_edges),
        "bias_fill_value": float(fill),
        "pooling_input": POOLING_INPUT if pooling["replaced"] else None,
        "pooling_replaced": pooling["replaced"],
        "attention_mask_removed": bool(dropped),
        "attention_mask_still_read_by": still,
        "count": len(removed),
        "removed_op_types": dict(sorted(Counter(n.op_type for n in removed).items())),
        "nodes": _names(removed),
    }


# --------------------------------------------------------------------------- 3. int32 inputs


def _int32_safe(tensor: str, consumers, outputs: set[str], through: list) -> bool:
    if tensor in outputs:
        return False
    for node, idx in consumers.get(tensor, []):
        if _INT32_INDEX_INPUT.get(node.op_type) == idx or node.op_type in _INT32_SINKS:
            continue
        if node.op_type in _SHAPE_ONLY and idx == 0:
            through.append(node)
            if _int32_safe(node.output[0], consumers, outputs, through):
                continue
        return False
    return True


def int32_inputs(model) -> dict:
    from onnx import TensorProto, helper

    graph = model.graph
    consumers = consumers_of(graph)
    outputs = _graph_output_names(graph)
    retyped, cast_inserted, through_all = [], [], []
    new_nodes = []
    for inp in graph.input:
        tt = inp.type.tensor_type
        if tt.elem_type != TensorProto.INT64:
            continue
        through: list = []
        if _int32_safe(inp.name, consumers, outputs, through):
            retyped.append(inp.name)
            through_all += through
        else:
            cast_out = f"{inp.name}_int64"
            for node, idx in consumers.get(inp.name, []):
                node.input[idx] = cast_out
            for out in graph.output:
                if out.name == inp.name:
                    raise StageError(
                        f"graph_surgery.int32_inputs: input {inp.name} is also a graph output; disable int32_inputs"
                    )
            cast = helper.make_node("Cast", [inp.name], [cast_out], name=f"{inp.name}_to_int64", to=TensorProto.INT64)
            new_nodes.append(cast)
            cast_inserted.append(inp.name)
        tt.elem_type = TensorProto.INT32
    if new_nodes:
        nodes = [*new_nodes, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
    # Tensors after retyped shape-only ops changed dtype: let shape inference recompute value_info.
    del graph.value_info[:]
    return {
        "retyped": retyped,
        "cast_inserted": cast_inserted,
        "count": len(through_all) + len(new_nodes),
        "nodes": _names([*through_all, *new_nodes]),
    }


# --------------------------------------------------------------------------- 4./5. ORT passes


def _op_diff(before, after) -> dict:
    b = Counter(n.op_type for n in before.graph.node)
    a = Counter(n.op_type for n in after.graph.node)
    names_before = {n.name for n in before.graph.node if n.name}
    names_after = {n.name for n in after.graph.node if n.name}
    return {
        "nodes_before": sum(b.values()),
        "nodes_after": sum(a.values()),
        "op_count_change": {op: a[op] - b[op] for op in sorted(set(a) | set(b)) if a[op] != b[op]},
        "count": len(names_before ^ names_after),
        "removed": sorted(names_before - names_after)[:MAX_NAMES],
        "added": sorted(names_after - names_before)[:MAX_NAMES],
    }


def _prune_opsets(model) -> None:
    used = {n.domain or "" for n in model.graph.node}
    kept = [o for o in model.opset_import if (o.domain or "") in used | {""}]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def fold_constants(model, tmp: Path):
    import onnx
    import onnxruntime as ort

    src, dst = tmp / "fold_in.onnx", tmp / "fold_out.onnx"
    onnx.save(model, src)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=["MatMulAddFusion"])
    out = onnx.load(dst)
    _prune_opsets(out)
    return out, _op_diff(model, out)


def _rename_generated(model, prefix: str) -> None:
    """Prefix the tensor/node names ORT's MatMulAddFusion generates (`gemm_input_shape`, ...).

    ORT 1.31 generates the same names again when it loads the saved model at ORT_ENABLE_EXTENDED or
    above and then fails with "AddInitializedOrtValue Attempt to replace the existing tensor".
    """
    graph = model.graph
    io = {i.name for i in graph.input} | _graph_output_names(graph)
    generated = {i.name for i in graph.initializer if i.name.startswith("gemm_")}
    generated |= {o for n in graph.node for o in n.output if o.startswith("gemm_") and o not in io}
    if not generated:
        return
    for init in graph.initializer:
        if init.name in generated:
            init.name = prefix + init.name
    for vi in graph.value_info:
        if vi.name in generated:
            vi.name = prefix + vi.name
    for node in graph.node:
        if node.name.startswith("gemm_"):
            node.name = prefix + node.name
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name in generated:
                    seq[i] = prefix + name


def qnn_preprocess(model, tmp: Path):
    import onnx
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    src, dst = tmp / "qnn_in.onnx", tmp / "qnn_out.onnx"
    # ORT 1.31's qnn_preprocess_model crashes on models that carry metadata_props: save without them.
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.metadata_props[:]
    onnx.save(bare, src)
    modified = qnn_preprocess_model(src, dst, fuse_layernorm=True)
    out = onnx.load(dst) if modified else model
    if modified:
        _rename_generated(out, "qnn_preprocess/")
        onnx.helper.set_model_props(
            out, {**{p.key: p.value for p in out.metadata_props}, **{p.key: p.value for p in model.metadata_props}}
        )
    return out, {"modified": bool(modified), **_op_diff(model, out)}


def _find_fill(model) -> float | None:
    from onnx import numpy_helper

    for node in model.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    arr = numpy_helper.to_array(attr.t)
                    if arr.dtype.kind == "f" and arr.size and _fill_mask(arr).any():
                        return float(arr[_fill_mask(arr)].ravel()[0])
    return None


def apply(proto, params: GraphSurgeryParams, tmp: Path) -> tuple[Any, dict]:
    """Every enabled transformation on `proto` (edited in place up to the ORT passes), in the order of
    the module docstring; returns the rewritten model (shapes inferred, checked) and a report per step."""
    import onnx

    report: dict[str, Any] = {}
    if params.mask_fill_value is not None:
        report["mask_fill_value"] = fix_mask_fill(proto, params.mask_fill_value)
    if params.float_mask_input:
        fill = params.mask_fill_value if params.mask_fill_value is not None else _find_fill(proto)
        fill = float(np.finfo(np.float32).min) if fill is None else fill
        report["float_mask_input"] = float_mask_input(proto, fill)
    if params.int32_inputs:
        report["int32_inputs"] = int32_inputs(proto)
    if params.fold_constants:
        proto, report["fold_constants"] = fold_constants(proto, tmp)
    if params.qnn_preprocess:
        proto, report["qnn_preprocess"] = qnn_preprocess(proto, tmp)
    meta = {p.key: p.value for p in proto.metadata_props}
    if params.float_mask_input:
        meta[META_FILL] = repr(report["float_mask_input"]["bias_fill_value"])
    meta[META_PARAMS] = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise StageError(f"graph_surgery: the rewritten model fails onnx.checker ({str(exc).splitlines()[0]})") from exc
    return proto, report


def compare(reference: Path, candidate: Path, samples: dict[str, np.ndarray]) -> float:
    """Minimum cosine between the two models' first outputs over the rows of `samples` (batch 1 each)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    ref = ort.InferenceSession(str(reference), so, providers=["CPUExecutionProvider"])
    try:
        new = ort.InferenceSession(str(candidate), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        msg = str(exc).strip().splitlines()[0][-200:] if str(exc).strip() else exc.__class__.__name__
        raise StageError(
            f"graph_surgery: ONNX Runtime cannot load the rewritten model ({msg}); disable the last option"
        ) from exc
    out_name = new.get_outputs()[0].name
    if out_name not in {o.name for o in ref.get_outputs()}:
        raise StageError(f"graph_surgery: output {out_name!r} missing from the input model")
    rows = len(next(iter(samples.values())))
    worst = 1.0
    for r in range(rows):
        one = {k: v[r : r + 1] for k, v in samples.items()}
        a = ref.run([out_name], build_feeds(ref, one))[0]
        b = new.run([out_name], build_feeds(new, one))[0]
        worst = min(worst, cosine(a, b))
    return worst
