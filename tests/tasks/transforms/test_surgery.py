"""The graph_surgery rewrites on a tiny random BERT: each option does what it says and fp32 outputs do not move."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from helpers import matches_reference, run_outputs

from tasks.core.feeds import build_feeds
from tasks.transforms import surgery
from tasks.transforms.surgery import GraphSurgeryParams

SEQ = 32
# Ops that, in this export, only occur on the attention-mask path (the other Expand is in the L2 norm).
MASK_CHAIN_OPS = {"Where", "And", "Unsqueeze", "Equal", "GreaterOrEqual", "Flatten", "ConstantOfShape"}





def _apply(tiny_onnx32, tmp_path, **kw) -> tuple[dict, list[dict], Path]:
    """The enabled rewrites applied to the export: their report, the new graph inputs and the saved model."""
    proto, report = surgery.apply(onnx.load(tiny_onnx32), GraphSurgeryParams(**kw), tmp_path)
    path = tmp_path / "surgery.onnx"
    onnx.save(proto, path)
    return report, surgery.input_info(proto.graph), path


def test_int32_inputs(tiny_onnx32, tokens32, tmp_path):
    report, inputs, model = _apply(tiny_onnx32, tmp_path, int32_inputs=True)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    assert types == {n: "tensor(int32)" for n in ("input_ids", "attention_mask", "token_type_ids")}
    retyped = report["int32_inputs"]
    assert sorted(retyped["retyped"] + retyped["cast_inserted"]) == ["attention_mask", "input_ids", "token_type_ids"]
    assert all(i["dtype"] == "int32" for i in inputs)
    feeds = build_feeds(sess, {k: v[:1] for k, v in tokens32.items()})
    assert all(v.dtype == np.int32 for v in feeds.values())
    assert matches_reference(run_outputs(tiny_onnx32, tokens32), run_outputs(model, tokens32), 0.99999)


def test_float_mask_input_removes_the_mask_chain(tiny_onnx32, tokens32, tmp_path):
    before = Counter(n.op_type for n in onnx.load(tiny_onnx32).graph.node)
    assert before.keys() & MASK_CHAIN_OPS
    report, inputs, model = _apply(tiny_onnx32, tmp_path, float_mask_input=True, int32_inputs=True)
    out = onnx.load(model)
    ops = Counter(n.op_type for n in out.graph.node)
    assert not ops.keys() & MASK_CHAIN_OPS
    assert ops["Expand"] == before["Expand"] - 1
    assert ops["Cast"] == 0  # no int64/bool casts left anywhere
    assert inputs == [
        {"name": "input_ids", "dtype": "int32", "shape": [1, SEQ]},
        {"name": "token_type_ids", "dtype": "int32", "shape": [1, SEQ]},
        {"name": "attention_bias", "dtype": "float32", "shape": [1, 1, 1, SEQ]},
        {"name": "pooling_mask", "dtype": "float32", "shape": [1, SEQ, 1]},
    ]
    mask = report["float_mask_input"]
    assert mask["attention_mask_removed"] and len(mask["bias_consumers"]) == 2  # one Add per layer
    assert mask["removed_op_types"]["Where"] == 2 and mask["count"] > 20

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = build_feeds(sess, {k: v[2:3] for k, v in tokens32.items()})
    real = int(tokens32["attention_mask"][2].sum())
    assert feeds["attention_bias"].shape == (1, 1, 1, SEQ)
    bias = feeds["attention_bias"][0, 0, 0]
    assert (bias[:real] == 0).all() and (bias[real:] == -100).all()
    assert feeds["pooling_mask"].shape == (1, SEQ, 1) and feeds["pooling_mask"].sum() == real
    assert matches_reference(run_outputs(tiny_onnx32, tokens32), run_outputs(model, tokens32), 0.99999)


def test_qnn_preprocess_fuses_gelu_and_still_loads(tiny_onnx32, tokens32, tmp_path):
    report, _, model = _apply(tiny_onnx32, tmp_path, qnn_preprocess=True, float_mask_input=True)
    ops = Counter(n.op_type for n in onnx.load(model).graph.node)
    assert ops["Gelu"] == 2 and ops["Erf"] == 0
    assert report["qnn_preprocess"]["op_count_change"]["Gelu"] == 2
    # The default session (ORT_ENABLE_ALL) must load it: ORT 1.31 re-fuses MatMul+Add under clashing names.
    assert matches_reference(run_outputs(tiny_onnx32, tokens32), run_outputs(model, tokens32), 0.99999)
