"""graph_surgery on a tiny random BERT: each option does what it says and fp32 outputs do not move."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tasks.config import ExportOnnxParams
from tasks.errors import InputError, StageError
from tasks.export_onnx import run as export_onnx
from tasks.export_onnx import tokenize
from tasks.graph_surgery import GraphSurgeryParams, build_feeds, run

SEQ = 32
SENTENCES = ["a man is playing a guitar.", "two dogs are running in the street with a red ball.", "a cat."]
# Ops that, in this export, only occur on the attention-mask path (the other Expand is in the L2 norm).
MASK_CHAIN_OPS = {"Where", "And", "Unsqueeze", "Equal", "GreaterOrEqual", "Flatten", "ConstantOfShape"}


@pytest.fixture(scope="module")
def tiny_onnx(tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "seq32"
    export_onnx(tiny_bert, SEQ, ExportOnnxParams(), out, key="t")
    return out / "model.onnx"


@pytest.fixture(scope="module")
def tokens(tiny_bert) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    arrays = tokenize(AutoTokenizer.from_pretrained(tiny_bert), SENTENCES, SEQ)
    assert (arrays["attention_mask"].sum(axis=1) < SEQ).all()  # every row is padded
    return arrays


def _embed(model: Path, arrays) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rows = [
        sess.run(None, build_feeds(sess, {k: v[i : i + 1] for k, v in arrays.items()}))[0]
        for i in range(len(arrays["input_ids"]))
    ]
    return np.concatenate(rows)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _huge_negatives(model: onnx.ModelProto) -> int:
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    arrays = [numpy_helper.to_array(t) for t in tensors]
    return sum(int((a < -1e30).sum()) for a in arrays if a.dtype.kind == "f")


def _surgery(tiny_onnx, tmp_path, **kw) -> tuple[dict, Path]:
    out = tmp_path / "surgery"
    payload = run(tiny_onnx, GraphSurgeryParams(**kw), out, key="k")
    assert json.loads((out / "stage.json").read_text())["key"] == "k"
    return payload, out / "model.onnx"


def test_default_replaces_float_min_fill_and_folds_constants(tiny_onnx, tokens, tmp_path):
    assert _huge_negatives(onnx.load(tiny_onnx)) == 1
    payload, model = _surgery(tiny_onnx, tmp_path)
    out = onnx.load(model)
    assert _huge_negatives(out) == 0
    fix = payload["transformations"]["mask_fill_value"]
    assert fix["count"] == 1 and fix["fill_value"] == -100 and fix["replaced_values"][0] < -3e38
    fold = payload["transformations"]["fold_constants"]
    assert fold["nodes_after"] == len(out.graph.node) < fold["nodes_before"]
    assert "Identity" not in Counter(n.op_type for n in out.graph.node)
    assert [i["name"] for i in payload["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert payload["verify_min_cosine"] >= 0.99999
    assert _min_cosine(_embed(tiny_onnx, tokens), _embed(model, tokens)) >= 0.99999


def test_int32_inputs(tiny_onnx, tokens, tmp_path):
    payload, model = _surgery(tiny_onnx, tmp_path, int32_inputs=True)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    assert types == {n: "tensor(int32)" for n in ("input_ids", "attention_mask", "token_type_ids")}
    report = payload["transformations"]["int32_inputs"]
    assert sorted(report["retyped"] + report["cast_inserted"]) == ["attention_mask", "input_ids", "token_type_ids"]
    assert all(i["dtype"] == "int32" for i in payload["inputs"])
    feeds = build_feeds(sess, {k: v[:1] for k, v in tokens.items()})
    assert all(v.dtype == np.int32 for v in feeds.values())
    assert _min_cosine(_embed(tiny_onnx, tokens), _embed(model, tokens)) >= 0.99999


def test_float_mask_input_removes_the_mask_chain(tiny_onnx, tokens, tmp_path):
    before = Counter(n.op_type for n in onnx.load(tiny_onnx).graph.node)
    assert before.keys() & MASK_CHAIN_OPS
    payload, model = _surgery(tiny_onnx, tmp_path, float_mask_input=True, int32_inputs=True)
    out = onnx.load(model)
    ops = Counter(n.op_type for n in out.graph.node)
    assert not ops.keys() & MASK_CHAIN_OPS
    assert ops["Expand"] == before["Expand"] - 1
    assert ops["Cast"] == 0  # no int64/bool casts left anywhere
    assert payload["inputs"] == [
        {"name": "input_ids", "dtype": "int32", "shape": [1, SEQ]},
        {"name": "token_type_ids", "dtype": "int32", "shape": [1, SEQ]},
        {"name": "attention_bias", "dtype": "float32", "shape": [1, 1, 1, SEQ]},
        {"name": "pooling_mask", "dtype": "float32", "shape": [1, SEQ, 1]},
    ]
    report = payload["transformations"]["float_mask_input"]
    assert report["attention_mask_removed"] and len(report["bias_consumers"]) == 2  # one Add per layer
    assert report["removed_op_types"]["Where"] == 2 and report["count"] > 20

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = build_feeds(sess, {k: v[2:3] for k, v in tokens.items()})
    real = int(tokens["attention_mask"][2].sum())
    assert feeds["attention_bias"].shape == (1, 1, 1, SEQ)
    bias = feeds["attention_bias"][0, 0, 0]
    assert (bias[:real] == 0).all() and (bias[real:] == -100).all()
    assert feeds["pooling_mask"].shape == (1, SEQ, 1) and feeds["pooling_mask"].sum() == real
    assert _min_cosine(_embed(tiny_onnx, tokens), _embed(model, tokens)) >= 0.99999


def test_qnn_preprocess_fuses_gelu_and_still_loads(tiny_onnx, tokens, tmp_path):
    payload, model = _surgery(tiny_onnx, tmp_path, qnn_preprocess=True, float_mask_input=True)
    ops = Counter(n.op_type for n in onnx.load(model).graph.node)
    assert ops["Gelu"] == 2 and ops["Erf"] == 0
    assert payload["transformations"]["qnn_preprocess"]["op_count_change"]["Gelu"] == 2
    # The default session (ORT_ENABLE_ALL) must load it: ORT 1.31 re-fuses MatMul+Add under clashing names.
    assert _min_cosine(_embed(tiny_onnx, tokens), _embed(model, tokens)) >= 0.99999


def test_a_leaky_mask_fails_the_fp32_check(tiny_onnx, tmp_path):
    with pytest.raises(StageError, match="cosine to the input model"):
        _surgery(tiny_onnx, tmp_path, mask_fill_value=-0.5)
    assert not (tmp_path / "surgery").exists()


def test_not_onnx_is_input_error(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_text("this is not a protobuf\n" * 20)
    with pytest.raises(InputError, match="model.onnx: not a valid ONNX model"):
        run(fake, GraphSurgeryParams(), tmp_path / "out", key="k")
    with pytest.raises(InputError, match="not found"):
        run(tmp_path / "missing.onnx", GraphSurgeryParams(), tmp_path / "out", key="k")


def test_params_reject_non_negative_or_infinite_fill():
    for bad in (0.0, 5.0, float("-inf"), -1e38):
        with pytest.raises(ValueError):
            GraphSurgeryParams(mask_fill_value=bad)
    assert GraphSurgeryParams(mask_fill_value=None).mask_fill_value is None


def test_build_feeds_rejects_inputs_it_cannot_make(tiny_onnx, tokens, tmp_path):
    _, model = _surgery(tiny_onnx, tmp_path, float_mask_input=True)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with pytest.raises(InputError, match="needs 'attention_mask'"):
        build_feeds(sess, {"input_ids": tokens["input_ids"][:1], "token_type_ids": tokens["token_type_ids"][:1]})
    # The fill value travels in the model metadata, and can be overridden.
    feeds = build_feeds(onnx.load(model), {k: v[:1] for k, v in tokens.items()}, mask_fill_value=-99.0)
    assert feeds["attention_bias"].min() == -99.0


def test_calibration_rows_join_the_check(tiny_onnx, tokens, tmp_path):
    from tasks.calibration_data import _save_npz

    good, bad = tmp_path / "calib_seq32.npz", tmp_path / "calib_seq16.npz"
    _save_npz(good, tokens)
    _save_npz(bad, {k: v[:, :16] for k, v in tokens.items()})
    payload = run(tiny_onnx, GraphSurgeryParams(float_mask_input=True), tmp_path / "a", key="k", calibration=good)
    assert payload["verify_rows"] == 4 + len(SENTENCES) and payload["verify_min_cosine"] >= 0.99999
    with pytest.raises(InputError, match="calib_seq16.npz: rows have length 16, the model takes 32"):
        run(tiny_onnx, GraphSurgeryParams(), tmp_path / "b", key="k", calibration=bad)
