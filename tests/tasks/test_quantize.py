"""tasks.quantize on a tiny random BERT: every method yields a quantized artifact that still runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from tasks.errors import InputError
from tasks.export_onnx import tokenize
from tasks.quantize import (
    DEFAULT_VARIANTS,
    NncfPtqSettings,
    NncfWeightsSettings,
    OrtDynamicSettings,
    OrtQnnSettings,
    OrtStaticSettings,
    QuantizeParams,
    needs_calibration,
    run,
)
from tiny_models import WORDS

SEQ = 16


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_fixed(tiny_onnx):
    """What graph_surgery does to the mask: the float-min fill becomes -1e4."""
    from onnx import numpy_helper

    model = onnx.load(tiny_onnx)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                arr = numpy_helper.to_array(attr.t)
                if arr.size and np.abs(arr).max() > 1e30:
                    attr.t.CopyFrom(numpy_helper.from_array(np.full_like(arr, -1e4), attr.t.name))
    path = tiny_onnx.with_name("fixed.onnx")
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def calib(tiny_bert, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("calib") / f"calib_seq{SEQ}.npz"
    np.savez(path, **tokenize(AutoTokenizer.from_pretrained(tiny_bert), _sentences(12, 0), SEQ))
    return path


@pytest.fixture(scope="module")
def eval_feeds(tiny_bert):
    from transformers import AutoTokenizer

    return tokenize(AutoTokenizer.from_pretrained(tiny_bert), _sentences(6, 1), SEQ)


def _ort_embed(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(["embedding"], {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(len(feeds["input_ids"]))]
    )


def _quantize(tmp_path, model, calib, name, settings, **extra):
    out = tmp_path / name
    payload = run(
        model=model, calibration=calib, variant=name, params=QuantizeParams(variants={name: settings}, **extra),
        out_dir=out, key="k-" + name,
    )
    return out, payload


def _min_cos(a, b):
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_default_variants_and_discriminated_settings():
    params = QuantizeParams()
    assert {"ort_qdq_a8w8", "ort_qdq_a8w8_allops", "ort_qdq_a16w8", "ort_dynamic_int8", "ov_nncf_int8", "ov_nncf_w8",
            "ov_nncf_w4"} <= set(params.variants)
    assert params.variants == DEFAULT_VARIANTS
    parsed = QuantizeParams.model_validate(
        {"variants": {"a": {"method": "ort_static", "calibrate_method": "Entropy"}, "b": {"method": "nncf_weights"}}}
    )
    assert isinstance(parsed.variants["a"], OrtStaticSettings) and parsed.variants["a"].calibrate_method == "Entropy"
    assert isinstance(parsed.variants["b"], NncfWeightsSettings) and parsed.variants["b"].mode == "int8_asym"
    with pytest.raises(ValidationError, match="extra"):
        QuantizeParams.model_validate({"variants": {"a": {"method": "ort_static", "per_chanel": True}}})
    with pytest.raises(ValidationError):
        QuantizeParams.model_validate({"variants": {"a": {"method": "tflite"}}})
    assert needs_calibration(OrtStaticSettings()) and not needs_calibration(OrtDynamicSettings())


def test_ort_static_a8w8(tmp_path, tiny_fixed, calib, eval_feeds):
    out, payload = _quantize(tmp_path, tiny_fixed, calib, "a8w8", OrtStaticSettings(calibration_rows=8))
    stamp = json.loads((out / "stage.json").read_text())
    assert stamp["key"] == "k-a8w8" and stamp["files"] == ["model.onnx"]
    assert payload["artifact"] == "model.onnx" and payload["calibration_rows"] == 8
    assert payload["quantize_linear_nodes"] > 20 and payload["dequantize_linear_nodes"] > payload["quantize_linear_nodes"]
    assert payload["tool_versions"]["onnxruntime"] == ort.__version__
    graph = onnx.load(out / "model.onnx").graph
    inits = {i.name: i for i in graph.initializer}
    # per-channel int8 weights: some DequantizeLinear reads an int8 weight with a vector of scales
    weight_dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                  and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert weight_dqs and any(len(inits[n.input[1]].dims) == 1 for n in weight_dqs)
    assert _min_cos(_ort_embed(out / "model.onnx", eval_feeds), _ort_embed(tiny_fixed, eval_feeds)) > 0.97


def _qparams(graph, tensor):
    """(scale, zero-point dtype) of the QuantizeLinear that quantizes `tensor` (or its DQ output)."""
    tensor = tensor.removesuffix("_DequantizeLinear_Output")
    inits = {i.name: i for i in graph.initializer}
    node = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(onnx.numpy_helper.to_array(inits[node.input[1]])), inits[node.input[2]].data_type


def test_ort_static_recipe_floor_and_16_bit_residuals(tmp_path, tiny_onnx, tiny_fixed, calib, eval_feeds):
    settings = DEFAULT_VARIANTS["ort_qdq_a8w8_allops"]
    assert settings.softmax_input_floor is not None and settings.residual_type == "uint16"
    assert settings.smooth_layernorm_alpha is not None
    # The floor clips the mask fill out of the score range, so even the unfixed export quantizes well.
    for model in (tiny_fixed, tiny_onnx):
        out, payload = _quantize(tmp_path, model, calib, f"recipe-{model.stem}", settings)
        q = onnx.load(out / "model.onnx").graph
        softmax_in = [n.input[0] for n in q.node if n.op_type == "Softmax"]
        for name in softmax_in:  # scale covers [floor, max score] in 8 bits, not [-1e4, max]
            scale, zp_type = _qparams(q, name)
            assert zp_type == onnx.TensorProto.UINT8 and scale < 40 / 255
        residual = [n.input[0] for n in q.node if n.op_type == "LayerNormalization"]
        assert {_qparams(q, name)[1] for name in residual} == {onnx.TensorProto.UINT16}
        unsmooth = [n for n in q.node if n.name.endswith("/unsmooth")]  # smoothing ran; skip path restored
        assert len(unsmooth) >= 3 and {_qparams(q, n.output[0])[1] for n in unsmooth} == {onnx.TensorProto.UINT16}
        matmul_in = [n.input[0] for n in q.node if n.op_type == "MatMul"]
        assert onnx.TensorProto.UINT8 in {_qparams(q, name)[1] for name in matmul_in if _has_q(q, name)}
        assert _min_cos(_ort_embed(out / "model.onnx", eval_feeds), _ort_embed(tiny_onnx, eval_feeds)) > 0.98


def test_layernorm_smoothing_is_exact_and_shrinks_outliers(tmp_path, tiny_fixed, calib):
    import onnxruntime as ort

    from tasks.quantize import load_calibration, smooth_layernorm_outputs

    feeds = load_calibration(calib, tiny_fixed, None)
    n = smooth_layernorm_outputs(tiny_fixed, tmp_path / "s.onnx", feeds, alpha=0.85, rows=8)
    lns = [x for x in onnx.load(tiny_fixed).graph.node if x.op_type == "LayerNormalization"]
    assert n == len(lns) - 1  # the last LayerNorm feeds pooling, not a MatMul

    def run(path):
        model = onnx.load(path)
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(x.output[0]) for x in lns[:-1])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return [session.run(None, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(4)]

    before, after = run(tiny_fixed), run(tmp_path / "s.onnx")
    for b, a in zip(before, after, strict=True):
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # same embedding
    peak = {"before": max(np.abs(x).max() for r in before for x in r[1:]),
            "after": max(np.abs(x).max() for r in after for x in r[1:])}
    assert peak["after"] <= peak["before"] + 1e-6  # LayerNorm outputs lose their outlier peaks
    scales = [onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "s.onnx").graph.initializer
              if i.name.endswith("/smooth_scale")]
    assert len(scales) == n and min(s.min() for s in scales) == 1.0 and max(s.max() for s in scales) > 1.0


def _ort_cpu_ops(path, tmp_path):
    """Op types of `path` as ONNX Runtime's CPU EP runs it (all graph optimizations, as the benchmark),
    and the float MatMul/Gemm nodes that read a DequantizeLinear output (layers run on dequantized values)."""
    from collections import Counter

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{path.parent.name}-ort.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    float_on_dq = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "FusedMatMul") and set(n.input) & dq_outputs]
    return Counter(n.op_type for n in graph.node), float_on_dq


def test_linear_layers_as_gemm_is_exact(tmp_path, tiny_fixed, eval_feeds):
    from tasks.quantize import linear_layers_as_gemm

    out = tmp_path / "gemm.onnx"
    assert linear_layers_as_gemm(tiny_fixed, out) == 12  # 2 layers x (q, k, v, out, ffn in, ffn out)
    graph = onnx.load(out).graph
    constant = {i.name for i in graph.initializer}
    assert sum(n.op_type == "Gemm" for n in graph.node) == 12
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constant]
    np.testing.assert_allclose(_ort_embed(out, eval_feeds), _ort_embed(tiny_fixed, eval_feeds), atol=1e-5)


def test_ort_static_cpu_recipe_runs_integer_gemms(tmp_path, tiny_fixed, calib, eval_feeds):
    """The default a8w8 recipe: every linear layer becomes one ORT CPU QGemm, attention stays float."""
    settings = DEFAULT_VARIANTS["ort_qdq_a8w8"]
    assert settings.gemm_linear_layers and not settings.activation_matmuls
    out, payload = _quantize(tmp_path, tiny_fixed, calib, "cpu", settings)
    q = onnx.load(out / "model.onnx").graph
    inits = {i.name: i for i in q.initializer}
    producers = {o: n for n in q.node for o in n.output}
    gemms = [n for n in q.node if n.op_type == "Gemm"]
    assert len(gemms) == 12
    for gemm in gemms:  # uint8 activation, int8 weight, int32 bias, each behind a DequantizeLinear
        dqs = [producers[i] for i in gemm.input]
        assert [d.op_type for d in dqs] == ["DequantizeLinear"] * 3
        assert inits[dqs[0].input[2]].data_type == onnx.TensorProto.UINT8
        assert [inits[d.input[0]].data_type for d in dqs[1:]] == [onnx.TensorProto.INT8, onnx.TensorProto.INT32]
        assert not _has_q(q, gemm.output[0])  # float output: no requantization
    attention = [n for n in q.node if n.op_type == "MatMul"]
    assert len(attention) == 4 and not any(i in producers and producers[i].op_type == "DequantizeLinear"
                                           for n in attention for i in n.input)

    ops, float_on_dq = _ort_cpu_ops(out / "model.onnx", tmp_path)
    assert ops["QGemm"] == 12 and not float_on_dq and ops["DequantizeLinear"] == 0
    assert _min_cos(_ort_embed(out / "model.onnx", eval_feeds), _ort_embed(tiny_fixed, eval_feeds)) > 0.98



def test_float_output_op_types_must_occur(tmp_path, tiny_fixed, calib):
    settings = OrtStaticSettings(float_output_op_types=["Matmul"])
    with pytest.raises(InputError, match="float_output_op_types"):
        _quantize(tmp_path, tiny_fixed, calib, "typo", settings)


def _has_q(graph, tensor):
    tensor = tensor.removesuffix("_DequantizeLinear_Output")
    return any(n.op_type == "QuantizeLinear" and n.input[0] == tensor for n in graph.node)


def test_ort_static_refuses_float_min_mask_without_floor(tmp_path, tiny_onnx, calib):
    for settings in (OrtStaticSettings(), OrtStaticSettings(calibrate_method="Entropy", softmax_input_floor=-20),
                     OrtQnnSettings()):
        with pytest.raises(InputError, match="run graph_surgery"):
            _quantize(tmp_path, tiny_onnx, calib, "raw", settings)


def test_ort_static_entropy_with_tensor_override(tmp_path, tiny_fixed, calib, eval_feeds):
    graph = onnx.load(tiny_fixed).graph
    softmax_in = next(n.input[0] for n in graph.node if n.op_type == "Softmax")
    settings = OrtStaticSettings(calibrate_method="Entropy", tensor_overrides={softmax_in: {"quant_type": "uint16"}})
    out, payload = _quantize(tmp_path, tiny_fixed, calib, "ent", settings, calibration_chunk=5)
    q = onnx.load(out / "model.onnx").graph
    inits = {i.name: i for i in q.initializer}
    zp_types = {inits[n.input[2]].data_type for n in q.node if n.op_type == "QuantizeLinear" and n.input[0] == softmax_in}
    assert zp_types == {onnx.TensorProto.UINT16}
    assert _min_cos(_ort_embed(out / "model.onnx", eval_feeds), _ort_embed(tiny_fixed, eval_feeds)) > 0.95


def test_ort_qnn_a16w8_uses_16_bit_activations(tmp_path, tiny_fixed, calib, eval_feeds):
    out, payload = _quantize(tmp_path, tiny_fixed, calib, "a16w8", OrtQnnSettings())
    q = onnx.load(out / "model.onnx").graph
    inits = {i.name: i for i in q.initializer}
    zp_types = {inits[n.input[2]].data_type for n in q.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    assert onnx.TensorProto.UINT16 in zp_types
    assert payload["quantize_linear_nodes"] > 20
    assert _min_cos(_ort_embed(out / "model.onnx", eval_feeds), _ort_embed(tiny_fixed, eval_feeds)) > 0.995


def test_ort_dynamic_needs_no_calibration(tmp_path, tiny_onnx, eval_feeds):
    out, payload = _quantize(tmp_path, tiny_onnx, None, "dyn", OrtDynamicSettings())
    assert payload["dynamic_quantize_nodes"] > 0 and payload["calibration_rows"] == 0
    assert _min_cos(_ort_embed(out / "model.onnx", eval_feeds), _ort_embed(tiny_onnx, eval_feeds)) > 0.97


def test_nncf_ptq_and_weight_compression(tmp_path, tiny_onnx, calib, eval_feeds):
    import openvino as ov

    out, payload = _quantize(tmp_path, tiny_onnx, calib, "ptq", NncfPtqSettings(subset_size=100))
    assert payload["artifact"] == "model.xml" and (out / "model.bin").is_file()
    assert payload["fake_quantize_ops"] > 10 and payload["calibration_rows"] == 12  # capped at the npz rows
    assert sorted(json.loads((out / "stage.json").read_text())["files"]) == ["model.bin", "model.xml"]
    compiled = ov.Core().compile_model(str(out / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = np.concatenate([compiled({k: v[i : i + 1] for k, v in eval_feeds.items()})[0] for i in range(6)])
    assert _min_cos(got, _ort_embed(tiny_onnx, eval_feeds)) > 0.97

    _, w8 = _quantize(tmp_path, tiny_onnx, None, "w8", NncfWeightsSettings())
    assert w8["fake_quantize_ops"] == 0 and w8["low_bit_weight_constants"].get("u8", 0) >= 12
    _, w4 = _quantize(tmp_path, tiny_onnx, None, "w4", NncfWeightsSettings(mode="int4_sym", group_size=16, ratio=1.0))
    assert w4["low_bit_weight_constants"].get("i4", 0) > 0
    assert w4["size_mb"] < w8["size_mb"] < payload["size_mb"] * 1.01


def test_unknown_variant_lists_known_ones(tmp_path, tiny_onnx, calib):
    with pytest.raises(InputError, match=r"unknown variant 'a4w4'.*ort_qdq_a8w8"):
        run(model=tiny_onnx, calibration=calib, variant="a4w4", params=QuantizeParams(), out_dir=tmp_path / "x", key="k")
    assert not (tmp_path / "x").exists()


def test_bad_inputs_are_one_line_input_errors(tmp_path, tiny_onnx, tiny_fixed, calib, tiny_bert):
    from transformers import AutoTokenizer

    wrong_len = tmp_path / "calib_seq8.npz"
    np.savez(wrong_len, **tokenize(AutoTokenizer.from_pretrained(tiny_bert), _sentences(4, 2), 8))
    params = QuantizeParams()
    cases = [
        (dict(calibration=wrong_len, variant="ort_qdq_a8w8"), "calibration file made for this sequence length"),
        (dict(calibration=None, variant="ov_nncf_int8"), "needs a calibration npz"),
        (dict(calibration=tmp_path / "nope.npz", variant="ort_qdq_a8w8"), "calibration npz not found"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            run(model=tiny_fixed, params=params, out_dir=tmp_path / "o", key="k", **kwargs)
    bad_nodes = QuantizeParams(variants={"v": OrtStaticSettings(nodes_to_exclude=["/no/such/node"])})
    with pytest.raises(InputError, match="nodes_to_exclude"):
        run(model=tiny_fixed, calibration=calib, variant="v", params=bad_nodes, out_dir=tmp_path / "o", key="k")
    with pytest.raises(InputError, match="ONNX model not found"):
        run(model=tmp_path / "missing.onnx", calibration=calib, variant="ort_qdq_a8w8", params=params,
            out_dir=tmp_path / "o", key="k")
    assert not (tmp_path / "o").exists()


def test_float_mask_surgery_model_gets_bias_feeds(tmp_path, tiny_onnx, calib, eval_feeds):
    """A graph_surgery float_mask_input model calibrates from the same tokenizer npz."""
    from tasks.graph_surgery import GraphSurgeryParams, build_feeds
    from tasks.graph_surgery import run as surgery

    surgery(tiny_onnx, GraphSurgeryParams(float_mask_input=True), tmp_path / "s", key="k")
    model = tmp_path / "s" / "model.onnx"
    out, payload = _quantize(tmp_path, model, calib, "bias", DEFAULT_VARIANTS["ort_qdq_a8w8"])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "attention_bias" in {i.name for i in session.get_inputs()}
    got = np.concatenate([
        session.run(["embedding"], build_feeds(session, {k: v[i : i + 1] for k, v in eval_feeds.items()}))[0]
        for i in range(len(eval_feeds["input_ids"]))
    ])
    assert _min_cos(got, _ort_embed(tiny_onnx, eval_feeds)) > 0.98
