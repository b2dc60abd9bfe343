"""Stage graph_surgery on a tiny random BERT: the default rewrite, its fp32 check and its input errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
from conftest import SENTENCE_ENCODER
from helpers import matches_reference, run_outputs
from onnx import numpy_helper

from tasks.core.errors import InputError, StageError
from tasks.families.sentence_encoder import FAMILY
from tasks.stages.graph_surgery import GraphSurgeryParams, run

SEQ = 32




def _huge_negatives(model: onnx.ModelProto) -> int:
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    arrays = [numpy_helper.to_array(t) for t in tensors]
    return sum(int((a < -1e30).sum()) for a in arrays if a.dtype.kind == "f")


def _surgery(tiny_onnx32, tmp_path, **kw) -> tuple[dict, Path]:
    out = tmp_path / "surgery"
    payload = run(tiny_onnx32, GraphSurgeryParams(**kw), SENTENCE_ENCODER, out, key="k")
    assert json.loads((out / "stage.json").read_text())["key"] == "k"
    return payload, out / "model.onnx"


def test_default_replaces_float_min_fill_and_folds_constants(tiny_onnx32, tokens32, tmp_path):
    assert _huge_negatives(onnx.load(tiny_onnx32)) == 1
    payload, model = _surgery(tiny_onnx32, tmp_path)
    out = onnx.load(model)
    assert _huge_negatives(out) == 0
    fix = payload["transformations"]["mask_fill_value"]
    assert fix["count"] == 1 and fix["fill_value"] == -100 and fix["replaced_values"][0] < -3e38
    fold = payload["transformations"]["fold_constants"]
    assert fold["nodes_after"] == len(out.graph.node) < fold["nodes_before"]
    assert "Identity" not in Counter(n.op_type for n in out.graph.node)
    assert [i["name"] for i in payload["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert payload["verify_min_cosine"] >= 0.99999
    assert matches_reference(run_outputs(tiny_onnx32, tokens32), run_outputs(model, tokens32), 0.99999)


def test_a_leaky_mask_fails_the_fp32_check(tiny_onnx32, tmp_path):
    with pytest.raises(StageError, match="cosine to the input model"):
        _surgery(tiny_onnx32, tmp_path, mask_fill_value=-0.5)
    assert not (tmp_path / "surgery").exists()


def test_not_onnx_is_input_error(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_text("this is not a protobuf\n" * 20)
    with pytest.raises(InputError, match="model.onnx: not a valid ONNX model"):
        run(fake, GraphSurgeryParams(), SENTENCE_ENCODER, tmp_path / "out", key="k")
    with pytest.raises(InputError, match="not found"):
        run(tmp_path / "missing.onnx", GraphSurgeryParams(), SENTENCE_ENCODER, tmp_path / "out", key="k")


def test_params_reject_non_negative_or_infinite_fill():
    for bad in (0.0, 5.0, float("-inf"), -1e38):
        with pytest.raises(ValueError):
            GraphSurgeryParams(mask_fill_value=bad)
    assert GraphSurgeryParams(mask_fill_value=None).mask_fill_value is None


def test_the_check_runs_the_family_samples_at_the_static_length(tiny_onnx32, tmp_path):
    """The fp32 check runs the family's synthetic samples (token ids padded at L, L/2, 12 and 3 tokens32),
    at the length the model was exported with; a model without a static length is an input error."""
    payload = run(tiny_onnx32, GraphSurgeryParams(float_mask_input=True), SENTENCE_ENCODER, tmp_path / "a", key="k")
    assert payload["seq_len"] == SEQ
    assert payload["verify_rows"] == 4 and payload["verify_min_cosine"] >= 0.99999
    samples = FAMILY.synthetic_samples(onnx.load(tiny_onnx32), SEQ)
    assert samples["attention_mask"].sum(axis=1).tolist() == [SEQ, SEQ // 2, 12, 3]

    dynamic = onnx.load(tiny_onnx32)
    for graph_input in dynamic.graph.input:
        graph_input.type.tensor_type.shape.dim[1].dim_param = "seq"
    onnx.save(dynamic, tmp_path / "dynamic.onnx")
    with pytest.raises(InputError, match="dynamic.onnx: input input_ids has no static last dimension"):
        run(tmp_path / "dynamic.onnx", GraphSurgeryParams(), SENTENCE_ENCODER, tmp_path / "b", key="k")
    assert not (tmp_path / "b").exists()
