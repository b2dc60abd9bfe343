"""OpenVINO CPU/NPU backends on a tiny random BERT (ONNX and IR, float and quantized)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import openvino as ov
import pytest
from conftest import SENTENCE_ENCODER
from tiny_models import WORDS

from tasks.backends._openvino import describe_precision
from tasks.backends.openvino_cpu import BACKEND as CPU
from tasks.backends.openvino_cpu import OpenVinoCpuBackend
from tasks.backends.openvino_npu import BACKEND as NPU
from tasks.core.errors import BackendUnavailableError, InputError
from tasks.families.sentence_encoder import FAMILY

SEQ = 16

@pytest.fixture(scope="module")
def feeds(tiny_bert):
    from transformers import AutoTokenizer

    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(4)]
    return FAMILY.samples(AutoTokenizer.from_pretrained(tiny_bert), sentences, SEQ)


def _rows(feeds):
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(len(feeds["input_ids"]))]


def _reference(onnx_path, feeds):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["embedding"], row)[0] for row in _rows(feeds)])


def test_cpu_runs_onnx_in_fp32_like_onnxruntime(tiny_onnx, feeds):
    assert CPU.name == "openvino_cpu" and CPU.engine_package == "openvino"
    assert CPU.unavailable_reason() is None
    model = CPU.load(tiny_onnx, 1)
    assert model.precision == "f32" == model.details["inference_precision_hint"]
    assert model.details["inference_num_threads"] == 1 and model.details["execution_devices"] == ["CPU"]
    got = np.concatenate([model.run(row) for row in _rows(feeds)])
    assert got.shape == (4, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(tiny_onnx, feeds), atol=1e-5)


def test_cpu_precision_is_read_back_not_assumed(tiny_onnx):
    # Ask for bf16: CPUs without bf16 units keep f32, AMX CPUs switch. Either way the label is the truth.
    model = OpenVinoCpuBackend(inference_precision="bf16").load(tiny_onnx, 1)
    actual = str(model.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()).lower()
    assert model.precision == actual and model.details["inference_precision_hint"] == actual


def test_cpu_loads_ir_with_int32_inputs_and_casts_int64_feeds(tiny_onnx, feeds, tmp_path):
    model = ov.Core().read_model(str(tiny_onnx))
    ppp = ov.preprocess.PrePostProcessor(model)
    for port in model.inputs:
        ppp.input(port.get_any_name()).tensor().set_element_type(ov.Type.i32)
    ov.save_model(ppp.build(), str(tmp_path / "model.xml"), compress_to_fp16=False)

    loaded = CPU.load(tmp_path / "model.xml", 2)
    assert set(loaded.inputs.values()) == {np.dtype(np.int32)}
    got = np.concatenate([loaded.run(row) for row in _rows(feeds)])  # int64 feeds, as the worker sends
    np.testing.assert_allclose(got, _reference(tiny_onnx, feeds), atol=1e-5)
    with pytest.raises(InputError, match="cannot be built from samples"):
        loaded.run({"input_ids": feeds["input_ids"][:1]})


def test_cpu_cache_dir_holds_compiled_blob(tiny_onnx, tmp_path):
    CPU.load(tiny_onnx, 1, cache_dir=tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())


def test_quantized_irs_report_mixed_precision(tiny_onnx, feeds, tmp_path):
    import nncf

    model = ov.Core().read_model(str(tiny_onnx))
    ov.save_model(nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM), str(tmp_path / "w8.xml"))
    loaded = CPU.load(tmp_path / "w8.xml", 1)
    assert loaded.details["quantization"]["int8_constants"] > 0
    assert loaded.precision in ("w8a32", "w8a8dyn+f32")  # the latter on CPUs that quantize activations on the fly
    got = np.concatenate([loaded.run(row) for row in _rows(feeds)])
    cos = np.sum(got * _reference(tiny_onnx, feeds), axis=1)
    assert cos.min() > 0.99

    dataset = nncf.Dataset(_rows(feeds))
    ptq = nncf.quantize(ov.Core().read_model(str(tiny_onnx)), dataset, model_type=nncf.ModelType.TRANSFORMER,
                        subset_size=4)
    ov.save_model(ptq, str(tmp_path / "int8.xml"), compress_to_fp16=False)
    loaded = CPU.load(tmp_path / "int8.xml", 1)
    assert loaded.details["quantization"]["fake_quantize"] > 0
    assert loaded.precision == "int8+f32"  # FakeQuantize layers really run as u8/i8 kernels
    assert any("8" in layer.split("/")[1] for layer in loaded.details["runtime_layers"])


def test_describe_precision_labels():
    f32_kernels = Counter({("f32", "brgemm_avx2_f32"): 4})
    assert describe_precision("f32", {}, f32_kernels) == "f32"
    assert describe_precision("bf16", {}, Counter()) == "bf16"
    int8_kernels = Counter({("u8", "brgemm_avx2_u8s8"): 2, ("f32", "brgemm_avx2_f32"): 1})
    assert describe_precision("f32", {"fake_quantize": 3}, int8_kernels) == "int8+f32"
    assert describe_precision("f32", {"fake_quantize": 3}, f32_kernels).startswith("f32 (int8 layers not used")
    # weight-only: u8 weights decompressed into an f32 kernel are not int8 arithmetic
    decompressed = Counter({("u8", "brgemm_avx2_f32"): 4})
    assert describe_precision("f32", {"int8_constants": 2}, decompressed) == "w8a32"
    assert describe_precision("f32", {"int4_constants": 2, "int8_constants": 2}, decompressed) == "w4a32"
    assert describe_precision("f32", {"int8_constants": 2}, int8_kernels) == "w8a8dyn+f32"
    assert describe_precision("f16", {"int8_constants": 2}, Counter()) == "w8a16"
    assert describe_precision("f32", {"dynamic_quantize": 9, "int8_constants": 2}, decompressed) == "dyn-int8 emulated in f32"


def test_bad_artifacts_are_input_errors(tiny_onnx, tmp_path):
    (tmp_path / "model.xml").write_text("<net/>")
    with pytest.raises(InputError, match="model.bin missing"):
        CPU.load(tmp_path / "model.xml", 1)
    with pytest.raises(InputError, match="not found"):
        CPU.load(tmp_path / "nope.onnx", 1)


def test_npu_is_unavailable_without_an_npu_and_never_falls_back(tiny_onnx):
    assert NPU.name == "openvino_npu" and NPU.engine_package == "openvino"
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU; see the device-marked test")
    reason = NPU.unavailable_reason()
    assert reason and "NPU not present" in reason and "CPU" in reason
    with pytest.raises(BackendUnavailableError, match="NPU not present"):
        NPU.load(tiny_onnx, 1)


def test_npu_runs_when_present(tiny_onnx, feeds):
    if NPU.unavailable_reason():
        pytest.skip(NPU.unavailable_reason())
    model = NPU.load(tiny_onnx, 1)
    assert model.details["execution_devices"] == ["NPU"]
    got = np.concatenate([model.run(row) for row in _rows(feeds)])
    assert np.sum(got * _reference(tiny_onnx, feeds), axis=1).min() > 0.99


def test_cpu_builds_float_mask_inputs_of_a_surgery_model(tiny_onnx, feeds, tmp_path):
    """graph_surgery float_mask_input: attention_bias/pooling_mask come from attention_mask, also for an IR."""
    import nncf

    from tasks.stages.graph_surgery import GraphSurgeryParams
    from tasks.stages.graph_surgery import run as surgery

    params = GraphSurgeryParams(float_mask_input=True)
    surgery(tiny_onnx, params, SENTENCE_ENCODER, tmp_path / "s", key="k")
    model_path = tmp_path / "s" / "model.onnx"
    names = {p.get_any_name() for p in ov.Core().read_model(str(model_path)).inputs}
    assert {"attention_bias", "pooling_mask"} <= names
    ir = tmp_path / "w8.xml"
    ov.save_model(nncf.compress_weights(ov.Core().read_model(str(model_path))), str(ir))
    for artifact, atol in ((model_path, 1e-5), (ir, 2e-2)):
        loaded = CPU.load(artifact, 1)
        assert loaded.mask_fill_value == params.mask_fill_value
        got = np.concatenate([loaded.run(row) for row in _rows(feeds)])  # int64 tokenizer feeds, as the worker sends
        np.testing.assert_allclose(got, _reference(tiny_onnx, feeds), atol=atol)
