"""OpenVINO `compile` (model.blob + IR + config), blob loading and the NPU offline bundle, on a tiny BERT."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest
from conftest import SENTENCE_ENCODER
from helpers import matches_reference
from tiny_models import WORDS

from tasks.backends.openvino_cpu import BACKEND as CPU
from tasks.backends.openvino_npu import BACKEND as NPU
from tasks.core.errors import BackendUnavailableError, ConfigError, InputError
from tasks.families.sentence_encoder import FAMILY

SEQ = 16
# What tasks.stages.compile passes (OpenVinoCompileParams.backend_options, threads included): npu_turbo is
# ignored on the CPU.
OPTIONS = {
    "performance_hint": "LATENCY", "num_streams": 1, "npu_turbo": True, "inference_precision": "f32", "threads": 1
}


@pytest.fixture(scope="module")
def rows(tiny_bert):
    from transformers import AutoTokenizer

    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(4)]
    feeds = FAMILY.samples(AutoTokenizer.from_pretrained(tiny_bert), sentences, SEQ)
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(len(sentences))]


def _outputs(model, rows) -> np.ndarray:
    return np.concatenate([model.run(row) for row in rows])



def test_cpu_compiles_onnx_to_a_blob_that_matches_its_source(tiny_onnx, rows, tmp_path):
    out = tmp_path / "c"
    result = CPU.compile(tiny_onnx, out, OPTIONS)

    assert result["artifact"] == "model.blob"
    assert sorted(result["files"]) == sorted(p.name for p in out.iterdir())  # no cache or temp files left
    assert set(result["files"]) == {"model.blob", "model.xml", "model.bin", "ov_config.json"}
    assert 0 < result["cached_compile_seconds"] < result["compile_seconds"]
    placement = result["placement"]
    assert placement["nodes_per_ep"]["CPU"] > 0 and placement["execution_devices"] == ["CPU"]
    assert placement["cpu_fallback"] == {"count": 0, "op_types": {}, "nodes": []}
    assert result["options"] == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
                                 "INFERENCE_PRECISION_HINT": "f32"}
    assert result["versions"]["openvino"] == ov.get_version() and "nncf" in result["versions"]
    assert result["precision"] == "f32"
    saved = json.loads((out / "ov_config.json").read_text())
    assert saved["device"] == "CPU" and saved["config"] == result["options"]
    # The IR beside the blob is static and keeps fp32 weights.
    ir = ov.Core().read_model(str(out / "model.xml"))
    assert all(p.get_partial_shape().is_static for p in ir.inputs)
    constants = [op for op in ir.get_ops() if op.get_type_name() == "Constant"]
    assert ov.Type.f16 not in {op.get_output_element_type(0) for op in constants}

    blob = CPU.load(out / "model.blob", 2)
    assert blob.precision == "f32" and blob.details["inference_num_threads"] == 2  # the caller's threads win
    reference = CPU.load_reference(tiny_onnx, 2)
    got, want = _outputs(blob, rows), _outputs(reference, rows)
    assert np.abs(got - want).max() < 1e-6 and matches_reference(got, want, 0.99999)


def test_cpu_compiles_a_quantized_surgery_ir_and_keeps_its_labels(tiny_onnx, rows, tmp_path):
    """An NNCF weight-compressed IR with float mask inputs: the blob keeps precision and mask fill."""
    import nncf

    from tasks.stages.graph_surgery import GraphSurgeryParams
    from tasks.stages.graph_surgery import run as surgery

    params = GraphSurgeryParams(float_mask_input=True)
    surgery(tiny_onnx, params, SENTENCE_ENCODER, tmp_path / "s", key="k")
    ir = tmp_path / "w8.xml"
    ov.save_model(nncf.compress_weights(ov.Core().read_model(str(tmp_path / "s" / "model.onnx"))), str(ir))

    result = CPU.compile(ir, tmp_path / "c", OPTIONS)
    assert result["precision"] in ("w8a32", "w8a8dyn+f32")
    blob = CPU.load(tmp_path / "c" / "model.blob", 1)
    assert blob.precision == result["precision"] and blob.details["quantization"]["int8_constants"] > 0
    assert blob.mask_fill_value == params.mask_fill_value
    got, want = _outputs(blob, rows), _outputs(CPU.load_reference(ir, 1), rows)  # int64 tokenizer feeds
    assert matches_reference(got, want, 0.99999)


def test_bad_inputs_and_blobs_are_one_line_errors(tiny_onnx, tmp_path):
    result = CPU.compile(tiny_onnx, tmp_path / "c", {"threads": 1})
    corrupt = tmp_path / "bad" / "model.blob"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a blob" * 64)
    with pytest.raises(InputError) as err:
        CPU.load(corrupt, 1)  # no ov_config.json beside it
    assert str(corrupt) in str(err.value) and "ov_config.json" in str(err.value) and "\n" not in str(err.value)
    (corrupt.parent / "ov_config.json").write_text((tmp_path / "c" / "ov_config.json").read_text())
    with pytest.raises(InputError) as err:
        CPU.load(corrupt, 1)
    assert str(corrupt) in str(err.value) and "cannot import" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="compiled for OpenVINO CPU, not NPU"):
        NPU._import_blob(tmp_path / "c" / result["artifact"], 1)  # load() stops earlier here: no NPU

    dynamic = ov.Core().read_model(str(tiny_onnx))
    dynamic.reshape({p.get_any_name(): ov.PartialShape([1, -1]) for p in dynamic.inputs})
    ov.save_model(dynamic, str(tmp_path / "dyn.xml"))
    with pytest.raises(InputError, match="dyn.xml: input .* dynamic shape"):
        CPU.compile(tmp_path / "dyn.xml", tmp_path / "d", OPTIONS)
    with pytest.raises(ConfigError, match="unknown compile options \\['soc_model'\\]"):
        CPU.compile(tiny_onnx, tmp_path / "d", {"soc_model": 57})


def test_npu_is_skipped_with_an_offline_bundle(tiny_onnx, tmp_path):
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    reason = NPU.unavailable_reason()
    assert reason and "NPU not present" in reason and "\n" not in reason
    with pytest.raises(BackendUnavailableError, match="NPU not present"):
        NPU.compile(tiny_onnx, tmp_path / "c", OPTIONS)  # never compiled on the CPU instead

    options = {**OPTIONS, "npu_turbo": False}
    options.pop("inference_precision")
    bundle = NPU.offline_bundle(tiny_onnx, tmp_path / "b", options)
    assert sorted(bundle["files"]) == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert set(bundle["files"]) == {"model.xml", "model.bin", "npu_config.json"}
    saved = json.loads((tmp_path / "b" / "npu_config.json").read_text())
    assert saved["device"] == "NPU"
    expected = {"PERFORMANCE_HINT": "LATENCY", "NPU_TURBO": False, "CACHE_DIR": "cache"}
    assert saved["config"] == bundle["options"] == expected
    assert "compile_model('model.xml'" in saved["how_to_compile"] and "\n" not in saved["how_to_compile"]
    ir = ov.Core().read_model(str(tmp_path / "b" / "model.xml"))
    assert [p.get_partial_shape().to_shape() for p in ir.inputs] == [ov.Shape([1, SEQ])] * 3
