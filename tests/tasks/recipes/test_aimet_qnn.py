"""Recipe aimet_qnn on a tiny random BERT: AIMET QuantSim with the HTP config, exported as QDQ + encodings."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import matches_reference, ort_embed, quantize_variant

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


def _softmax_input_scales(path) -> list[float]:
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    return [float(inits[producers[n.input[0]].input[1]]) for n in graph.node if n.op_type == "Softmax"]


def test_the_softmax_input_encoding_starts_at_the_floor_not_the_mask_fill(tmp_path, tiny_fixed, calib):
    """At 8 bits the -1e4 mask fill would set the Softmax input step to ~40 logits (every real score in one step);
    with the floor (-20) the step spans the scores. Off, the calibrated minimum rules."""
    floored, _ = quantize_variant(tmp_path, tiny_fixed, calib, "floored", AimetQnnSettings(activation_bits=8))
    raw, _ = quantize_variant(tmp_path, tiny_fixed, calib, "raw",
                              AimetQnnSettings(activation_bits=8, softmax_input_floor=None))
    assert len(_softmax_input_scales(floored / "model.onnx")) == 2  # one per layer of the tiny BERT
    assert max(_softmax_input_scales(floored / "model.onnx")) < 1.0
    assert min(_softmax_input_scales(raw / "model.onnx")) > 1e4 / 256


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
