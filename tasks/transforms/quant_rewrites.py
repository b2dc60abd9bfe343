"""Rewrites and graph facts the quantization recipes share; none depends on the model family.

- `linear_layers_as_gemm`: MatMul + bias Add as one Gemm, so ONNX Runtime CPU fuses each layer into a QGemm.
- `activation_matmuls`: the MatMuls of two activations (attention Q.K^T and P.V) and their score scaling.
- `softmax_floor_ranges`: a floor under each calibrated Softmax input range (the attention-mask fill
  otherwise stretches it).
- `huge_float_constants`: float constants beyond 1e30 (the float-min attention-mask fill of HF exports).
- `unshare_biases`: a Gemm/Conv bias that several layers read, one copy per layer.
- `unit_norm_outputs`: outputs of L2 normalisations, bounded by [-1, 1] whatever calibration saw.
- `int32_biases`: a Gemm's float bias as int32 on the scales of its quantized input and weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.core.errors import StageError
from tasks.core.onnx_graph import constants as constants_of
from tasks.core.onnx_graph import drop_unused_initializers, initializers, load_model


def huge_float_constants(model_path: Path, limit: float = 1e30) -> list[str]:
    """Float initializers/Constants holding |v| > limit: the float-min attention-mask fill of HF exports."""
    from onnx import numpy_helper

    graph = load_model(model_path, weights=False).graph
    found = []
    tensors = [(i.name, i) for i in graph.initializer]
    tensors += [(n.name or n.output[0], a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for name, tensor in tensors:
        if tensor.data_type in (1, 10, 11, 16) and not tensor.external_data:  # float, float16, double, bfloat16
            arr = numpy_helper.to_array(tensor)
            if arr.size and np.abs(arr.astype(np.float64)).max() > limit:
                found.append(name)
    return found


def linear_layers_as_gemm(model: Path, out: Path) -> int:
    """Rewrite every MatMul(x, W) + Add(b) (W [K, N] and b [N] constants, x of known rank) as
    Reshape(x, [M, K]) -> Gemm(x, W, b) -> Reshape([..., N]); exact in float. Returns how many. A free
    leading dimension (a dynamic-shape export) flattens to [-1, K] and takes the output shape from x at run time.

    This is what ONNX Runtime's MatMulAddFusion does at session start; done before quantization, the
    quantizer puts the activation's Q/DQ pair right at the Gemm and quantizes the bias to int32, so ORT
    CPU fuses each layer into one QGemm instead of running it in float.
    """
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    proto = shape_inference.infer_shapes(onnx.load(str(model)))
    graph = proto.graph
    shapes = {}
    for info in (*graph.value_info, *graph.input):
        dims = info.type.tensor_type.shape.dim
        if len(dims) >= 2:  # K comes from the weight; None: a free dimension
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims[:-1]]
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    constant = initializers(graph)

    def linear(node):  # (bias Add, weight, bias, input's leading dims) of a MatMul + Add layer, else None
        readers = users.get(node.output[0], [])
        if node.op_type != "MatMul" or len(readers) != 1 or readers[0].op_type != "Add":
            return None
        add = readers[0]
        weight, x_shape = constant(node.input[1]), shapes.get(node.input[0])
        bias = constant(next((i for i in add.input if i != node.output[0]), ""))
        if weight is None or bias is None or len(weight.dims) != 2 or list(bias.dims) != [weight.dims[1]] or not x_shape:
            return None
        return add, weight, bias, x_shape

    nodes, fused_adds, count = [], set(), 0
    for node in graph.node:
        if node.op_type == "Add" and node.output[0] in fused_adds:
            continue
        layer = linear(node)
        if layer is None:
            nodes.append(node)
            continue
        add, weight, bias, x_shape = layer
        k, n = weight.dims
        static = None not in x_shape
        flat_in, flat_out = f"{node.name}/gemm_input", f"{node.name}/gemm_output"
        out_shape = f"{add.output[0]}_shape"
        # A bias of its own: ORT quantizes a Gemm bias initializer to int32 in place, which would also
        # hand that int32 copy to any other reader of a shared (exporter-deduplicated) bias.
        own_bias = f"{node.name}/bias"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([int(np.prod(x_shape)) if static else -1, k], np.int64), f"{flat_in}_shape"),
            numpy_helper.from_array(numpy_helper.to_array(bias), own_bias),
        ])
        if static:
            graph.initializer.append(numpy_helper.from_array(np.array([*x_shape, n], np.int64), out_shape))
        else:  # x's leading dims at run time, then N
            graph.initializer.append(numpy_helper.from_array(np.array([n], np.int64), f"{out_shape}_last"))
            nodes += [
                helper.make_node("Shape", [node.input[0]], [f"{out_shape}_lead"], name=f"{node.name}/lead_shape", end=-1),
                helper.make_node("Concat", [f"{out_shape}_lead", f"{out_shape}_last"], [out_shape],
                                 name=f"{node.name}/out_shape", axis=0),
            ]
        nodes += [
            helper.make_node("Reshape", [node.input[0], f"{flat_in}_shape"], [flat_in], name=f"{node.name}/flatten"),
            helper.make_node("Gemm", [flat_in, weight.name, own_bias], [flat_out], name=node.name),
            helper.make_node("Reshape", [flat_out, out_shape], [add.output[0]], name=f"{node.name}/unflatten"),
        ]
        fused_adds.add(add.output[0])
        count += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    drop_unused_initializers(graph)  # the biases the private copies replaced
    onnx.save(proto, str(out))
    return count


def activation_matmuls(graph) -> list[str]:
    """Names of the MatMuls whose two inputs are activations (attention Q.K^T and P.V), and of the Mul/Div
    by a constant that is the sole consumer of one (attention's score scaling), so none gets a QDQ pair."""
    constants = constants_of(graph) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names = []
    for node in graph.node:
        if node.op_type != "MatMul" or any(i in constants for i in node.input):
            continue
        names.append(node.name)
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type in ("Mul", "Div") and any(i in constants for i in after[0].input):
            names.append(after[0].name)
    if not all(names):
        raise StageError("quantize: an unnamed attention MatMul cannot be kept in float; name the nodes")
    return names


def softmax_floor_ranges(graph, ranges, floor: float) -> dict[str, tuple[np.float32, np.float32]]:
    """(rmin, rmax) for every calibrated Softmax input: the floor (kept below the calibrated maximum)
    and that maximum."""
    floored = {}
    for node in graph.node:
        if node.op_type == "Softmax" and node.input[0] in ranges:
            high = float(np.asarray(ranges[node.input[0]].range_value[1]).ravel()[0])
            floored[node.input[0]] = (np.float32(min(floor, high - 1e-3)), np.float32(high))
    return floored


def unshare_biases(graph) -> int:
    """Give every Gemm/Conv its own copy of a bias initializer other nodes read too; returns how many.

    Exporters deduplicate equal tensors (e.g. the all-zero biases of freshly initialised layers). ORT's
    QNN recipe then quantizes a shared bias as a 16-bit activation rather than an int32 bias, the layer is
    no QDQ unit, and its weight's DequantizeLinear falls back to the CPU.
    """
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    inits = {i.name: i for i in graph.initializer}
    copies = 0
    for node in graph.node:
        if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and readers.get(node.input[2], 0) > 1 \
                and node.input[2] in inits:
            clone = type(inits[node.input[2]])()
            clone.CopyFrom(inits[node.input[2]])
            clone.name = f"{node.input[2]}/{node.name or node.output[0]}"
            graph.initializer.append(clone)
            readers[node.input[2]] -= 1
            node.input[2] = clone.name
            copies += 1
    return copies


def unit_norm_outputs(graph) -> list[str]:
    """Outputs of every L2 LpNormalization (what qnn_preprocess fuses a normalize into): always in [-1, 1]."""
    return [n.output[0] for n in graph.node
            if n.op_type == "LpNormalization" and next((a.i for a in n.attribute if a.name == "p"), 2) == 2]


def int32_biases(graph) -> int:
    """Quantize the float bias of every Gemm whose input and weight come through DequantizeLinear: int32,
    scale = input scale x weight scale (per output channel), zero point 0, as ONNX Runtime's quantizer does.

    A Gemm with a float bias is no QDQ unit for ONNX Runtime's QNN EP, and its weight's DequantizeLinear
    then falls back to the CPU. Returns how many biases were quantized.
    """
    from onnx import helper, numpy_helper

    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}

    def dequantized(name: str):
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            return None
        return node

    nodes, count = [], 0
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        x, w = dequantized(node.input[0]), dequantized(node.input[1])
        bias = numpy_helper.to_array(inits[node.input[2]])
        if x is None or w is None or bias.dtype != np.float32 or bias.ndim != 1:
            continue
        scale = (numpy_helper.to_array(inits[x.input[1]]).astype(np.float64)
                 * numpy_helper.to_array(inits[w.input[1]]).astype(np.float64)) * np.ones(bias.shape)
        if np.any(scale <= 0):
            continue
        limit = np.iinfo(np.int32)
        quantized = np.clip(np.round(bias / scale), limit.min, limit.max).astype(np.int32)
        base = f"{node.input[2]}/int32"
        graph.initializer.extend([
            numpy_helper.from_array(quantized, base),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{base}_zero_point"),
        ])
        nodes.insert(len(nodes) - 1, helper.make_node(  # before its Gemm: the node list stays sorted
            "DequantizeLinear", [base, f"{base}_scale", f"{base}_zero_point"], [f"{base}_dq"], name=f"{base}_dq", axis=0))
        node.input[2] = f"{base}_dq"
        count += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return count
