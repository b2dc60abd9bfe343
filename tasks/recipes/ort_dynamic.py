"""Recipe `ort_dynamic`: ONNX Runtime's `quantize_dynamic`: int8 weights, activations quantized at run time (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.core.errors import StageError
from tasks.recipes._ort import onnx_quant_counts, preprocess, qtype
from tasks.recipes.base import ONNX_ARTIFACT, RecipeContext, RecipeSettings


class OrtDynamicSettings(RecipeSettings):
    """Dynamic quantization: int8 weights, activation ranges computed at run time (CPU only)."""

    method: Literal["ort_dynamic"] = "ort_dynamic"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: list[str] | None = Field(None, description="null = ORT's default (MatMul, Gather, ...)")
    nodes_to_exclude: list[str] = Field([], description="node names or patterns (`*/intermediate/dense/*`) of the "
                                        "pre-processed graph kept in float")
    transformer_fusion: Literal["bert"] | None = Field(
        None, description="ONNX Runtime's transformer fusions (onnxruntime.transformers.optimizer, this model type) "
        "before quantizing: Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization (a 6-layer BERT: 302 nodes "
        "-> 58), which is what short inputs pay for on a CPU; null = off",
    )


def attention_shape(model: Path) -> tuple[int, int]:
    """(heads, width) of the first self-attention: the projection MatMul(+Add) whose output is reshaped to
    [..., -1, head_size]. ONNX Runtime's own detection reads a constant [0, 0, heads, head_size] shape, which an
    export with a free token axis computes at run time instead."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    consts = {i.name: i for i in graph.initializer}
    consts |= {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}

    def width(name: str) -> int | None:  # output width of a linear layer: MatMul(x, W[K, N]) (+ Add)
        node = producer.get(name)
        if node is not None and node.op_type == "Add":
            node = next((producer[i] for i in node.input if i in producer and producer[i].op_type == "MatMul"), None)
        if node is None or node.op_type != "MatMul" or node.input[1] not in consts:
            return None
        dims = consts[node.input[1]].dims
        return int(dims[-1]) if len(dims) == 2 else None

    for node in graph.node:
        shape = producer.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if shape is None or shape.op_type != "Concat" or shape.input[-1] not in consts:
            continue
        head = numpy_helper.to_array(consts[shape.input[-1]]).reshape(-1)
        n = width(node.input[0])
        if n and len(head) == 1 and head[0] > 0 and n % int(head[0]) == 0:
            return n // int(head[0]), n
    raise StageError(f"{model.name}: no attention projection reshaped to [..., heads, head_size] found; "
                     "set transformer_fusion: null for this model")


def fuse_transformer(model: Path, model_type: str, out: Path) -> dict[str, int]:
    """`model` with ONNX Runtime's transformer fusions (heads and width read from the graph) saved to `out`; the
    fused operator counts. StageError when no attention fused (the graph is not of `model_type`'s pattern)."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads, width = attention_shape(model)
    optimized = optimize_model(str(model), model_type=model_type, num_heads=heads, hidden_size=width, opt_level=1)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    if not fused.get("Attention"):
        raise StageError(f"quantize (ort_dynamic): transformer_fusion {model_type} fused no Attention in {model.name} "
                         f"(fused: {fused or 'nothing'}); set transformer_fusion: null for this model")
    optimized.save_model_to_file(str(out))
    return fused


def _ort_dynamic(model: Path, s: OrtDynamicSettings, out: Path, tmp: Path) -> dict:
    from onnxruntime.quantization import quantize_dynamic

    fused = {}
    if s.transformer_fusion:
        fused = fuse_transformer(model, s.transformer_fusion, tmp / "fused.onnx")
        model = tmp / "fused.onnx"
    pre, excluded = preprocess(model, tmp, s)
    # quantize_dynamic replaces each Gemm by MatMul `<gemm>_MatMul` + Add before it reads nodes_to_exclude.
    excluded += [f"{name}_MatMul" for name in excluded]
    quantize_dynamic(
        str(pre),
        str(out),
        op_types_to_quantize=s.op_types,
        per_channel=s.per_channel,
        reduce_range=s.reduce_range,
        weight_type=qtype(s.weight_type),
        nodes_to_exclude=excluded,
    )
    return {"fused_operators": fused} if fused else {}


class OrtDynamicRecipe:
    method = "ort_dynamic"
    settings = OrtDynamicSettings
    artifact = ONNX_ARTIFACT
    companions = ()
    dynamic_shapes = True
    tools = ("onnx", "onnxruntime")

    def needs_calibration(self, settings: OrtDynamicSettings) -> bool:
        return False

    def check(self, model: Path, settings: OrtDynamicSettings) -> None:
        return None  # no activation ranges are calibrated, so the mask fill does not matter

    def apply(self, model: Path, feeds, settings: OrtDynamicSettings, context: RecipeContext, out: Path, tmp: Path) -> dict:
        return {"calibration_rows": 0, **_ort_dynamic(model, settings, out, tmp)}

    def counts(self, artifact: Path) -> dict:
        return onnx_quant_counts(artifact)


RECIPE = OrtDynamicRecipe()
