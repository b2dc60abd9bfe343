"""Recipe aimet_qnn on a tiny random BERT: AIMET QuantSim with the HTP config, exported as QDQ + encodings."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import matches_reference, ort_embed, qdq_bits, quantize_variant

from tasks.recipes.aimet_qnn import ENCODINGS, AimetQnnSettings
from tasks.recipes.ort_qnn import OrtQnnSettings

pytest.importorskip("aimet_onnx")


def _zero_point_types(model) -> set[int]:
    inits = {i.name: i for i in model.graph.initializer}
    return {inits[n.input[2]].data_type for n in model.graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}


def test_a16w8_writes_a_16_bit_qdq_model_and_its_encodings(tmp_path, tiny_fixed, calib, eval_feeds):
    out, payload = quantize_variant(tmp_path, tiny_fixed, calib, "aimet_a16w8", AimetQnnSettings())

    assert sorted(p.name for p in out.iterdir()) == [ENCODINGS, "model.onnx", "stage.json"]
    model = onnx.load(out / "model.onnx")
    assert onnx.TensorProto.UINT16 in _zero_point_types(model)
    assert payload["quantize_linear_nodes"] > 20 and payload["calibration_rows"] == 12
    encodings = json.loads((out / ENCODINGS).read_text())
    assert {e["bw"] for e in encodings["activation_encodings"]} >= {16}
    assert {e["bw"] for e in encodings["param_encodings"]} == {8}
    assert payload["encodings"] == {"activation": len(encodings["activation_encodings"]),
                                    "param": len(encodings["param_encodings"])}
    quantized, reference = ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_fixed, eval_feeds)
    assert matches_reference(quantized, reference, 0.99)

    # AIMET ran in a process of its own: a variant ONNX Runtime quantizes next carries no AIMET op domain.
    after, _ = quantize_variant(tmp_path, tiny_fixed, calib, "ort_a16w8", OrtQnnSettings())
    assert not [o.domain for o in onnx.load(after / "model.onnx").opset_import if "aimet" in o.domain]


def test_a8w8_uses_8_bit_activations(tmp_path, tiny_fixed, calib, eval_feeds):
    settings = AimetQnnSettings(activation_bits=8, quant_scheme="tf_enhanced", htp_config="htp_v73")
    out, _ = quantize_variant(tmp_path, tiny_fixed, calib, "aimet_a8w8", settings)

    model = onnx.load(out / "model.onnx")
    assert onnx.TensorProto.UINT16 not in _zero_point_types(model)
    assert onnx.TensorProto.UINT8 in _zero_point_types(model)
    quantized, reference = ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_fixed, eval_feeds)
    assert matches_reference(quantized, reference, 0.95)


def _softmax_input_ranges(path) -> list[tuple[float, float]]:
    """(lowest, highest) value each Softmax input's 8-bit encoding represents."""
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    ranges = []
    for node in (n for n in graph.node if n.op_type == "Softmax"):
        dq = producers[node.input[0]]
        scale, zero_point = float(inits[dq.input[1]]), int(inits[dq.input[2]])
        ranges.append((-zero_point * scale, (255 - zero_point) * scale))
    return ranges


def test_the_softmax_input_encoding_spans_the_floor_to_the_largest_score(tmp_path, tiny_fixed, calib):
    """At 8 bits the -1e4 mask fill would set the Softmax input step to ~40 logits (every real score in one step);
    with the floor (-20) the encoding spans [-20, the largest calibrated score]. AIMET's own maximum, snapped to
    the coarse grid, was 0 in a MiniLM layer: every positive score clipped. Off, the calibrated minimum rules."""
    from onnx import numpy_helper

    model = onnx.load(tiny_fixed)  # sharper attention: the tiny random BERT's scores all sit within one 8-bit step
    inits = {i.name: i for i in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "MatMul" and "query" in n.name):
        weight = inits[node.input[1]]
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 40, weight.name))
    sharp = tmp_path / "sharp.onnx"
    onnx.save(model, sharp)
    floored, _ = quantize_variant(tmp_path, sharp, calib, "floored", AimetQnnSettings(activation_bits=8))
    raw, _ = quantize_variant(tmp_path, sharp, calib, "raw", AimetQnnSettings(activation_bits=8, softmax_input_floor=None))
    ranges = _softmax_input_ranges(floored / "model.onnx")
    assert len(ranges) == 2  # one per layer of the tiny BERT
    assert all(low == pytest.approx(-20, abs=0.5) and 1 < high < 20 for low, high in ranges), ranges
    assert all(low < -9000 for low, _ in _softmax_input_ranges(raw / "model.onnx"))


def test_residual_bits_keep_the_layernorm_inputs_at_16_in_an_8_bit_graph(tmp_path, tiny_fixed, calib, eval_feeds):
    """BERT's outlier channels live in the residual sums: residual_bits 16 quantizes each LayerNorm input (and the
    branch added into it) at 16 bits, everything else at 8; smoothing first leaves the float model unchanged."""
    settings = AimetQnnSettings(activation_bits=8, residual_bits=16, smooth_layernorm_alpha=0.85)
    out, _ = quantize_variant(tmp_path, tiny_fixed, calib, "residual16", settings)
    graph = onnx.load(out / "model.onnx").graph
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    residual = [n for n in norms if "embeddings" not in n.name]  # the embeddings' LayerNorm sums no residual
    assert len(residual) == 4 and {qdq_bits(graph, n.input[0]) for n in residual} == {16}
    assert onnx.TensorProto.UINT8 in _zero_point_types(onnx.load(out / "model.onnx"))
    assert matches_reference(ort_embed(out / "model.onnx", eval_feeds), ort_embed(tiny_fixed, eval_feeds), 0.95)


def _integer_weights(path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2}


@pytest.mark.slow  # two AIMET quantizations per case, ~40 s each here
@pytest.mark.parametrize("rounding", ["seq_mse", "adaround"])
def test_seq_mse_and_adaround_choose_other_integer_weights(tmp_path, tiny_fixed, calib, eval_feeds, rounding):
    a8w8 = dict(activation_bits=8, htp_config="htp_v75")
    nearest, _ = quantize_variant(tmp_path, tiny_fixed, calib, "nearest", AimetQnnSettings(**a8w8))
    settings = AimetQnnSettings(**a8w8, weight_rounding=rounding, seq_mse_candidates=5, adaround_iterations=20,
                                rounding_rows=4)
    tuned, payload = quantize_variant(tmp_path, tiny_fixed, calib, rounding, settings)

    base, other = _integer_weights(nearest / "model.onnx"), _integer_weights(tuned / "model.onnx")
    assert base.keys() == other.keys() and len(base) >= 12  # every linear layer's weight, as int8
    if rounding == "adaround":  # the learned rounding moves weights off the nearest grid point
        changed = [name for name in base if not np.array_equal(base[name], other[name])]
        assert len(changed) >= len(base) // 2, changed
    else:  # SeqMSE picks each weight range among clipped candidates: never wider than min-max
        scales = {e["name"]: np.asarray(e["scale"]) for e in json.loads((nearest / ENCODINGS).read_text())["param_encodings"]}
        searched = json.loads((tuned / ENCODINGS).read_text())["param_encodings"]
        assert searched and all((np.asarray(e["scale"]) <= scales[e["name"]] * (1 + 1e-6)).all() for e in searched)
    assert payload["settings"]["weight_rounding"] == rounding
    assert (payload["rounding_rows"], payload["calibration_rows"]) == (4, 12)  # the rows, not all, tune the weights
    quantized, reference = ort_embed(tuned / "model.onnx", eval_feeds), ort_embed(tiny_fixed, eval_feeds)
    assert matches_reference(quantized, reference, 0.95)
