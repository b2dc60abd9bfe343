"""Stage compile for qnn_htp: artifact + placement report, CPU-fallback gate, verification, SoC targets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCE_ENCODER
from helpers import qdq_bits
from pydantic import ValidationError

from tasks.backends.qnn_htp import QNN_SOCS, QnnHtpCompileParams
from tasks.config import CompileParams
from tasks.core.errors import ConfigError, InputError, StageError
from tasks.core.fingerprint import is_current, read_stamp
from tasks.families.sentence_encoder import FAMILY
from tasks.stages.compile import CompileCheckParams, run

# Shared tiny-model builders live beside the backend test (tests/tasks/backends has no __init__.py).
_spec = importlib.util.spec_from_file_location(
    "qnn_htp_models", Path(__file__).parents[1] / "backends" / "test_qnn_htp.py"
)
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)


@pytest.fixture(scope="module", autouse=True)
def qnn_available():
    from tasks.backends.qnn_htp import BACKEND

    reason = BACKEND.unavailable_reason()
    if reason:
        pytest.skip(f"qnn_htp unavailable: {reason}")


@pytest.fixture(scope="module")
def tiny_qdq(tiny_bert, tmp_path_factory) -> Path:
    return models.make_tiny_qdq(tiny_bert, tmp_path_factory.mktemp("qdq"))


@pytest.fixture(scope="module")
def unsupported_onnx(tmp_path_factory) -> Path:
    return models.make_unsupported_graph(tmp_path_factory.mktemp("bad") / "shrink.onnx")


def test_tiny_qdq_compiles_with_zero_fallback_and_reproduces_the_cpu_ep(tiny_qdq, tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    from tasks.backends.qnn_htp import BACKEND

    out = tmp_path / "compile"
    params = CompileCheckParams(threads=1)
    payload = run(tiny_qdq, "qnn_htp", "snapdragon_8_gen_3", params, QnnHtpCompileParams(), SENTENCE_ENCODER, out,
                  key="k1", model_dir=tiny_bert)

    assert is_current(out, "k1")
    assert sorted(read_stamp(out)["files"]) == ["model_ctx.onnx", "model_ctx_qnn.bin", "placement.json"]
    assert payload["cpu_fallback_nodes"] == 0 and payload["nodes_per_ep"]["CPUExecutionProvider"] == 0
    placement = json.loads((out / "placement.json").read_text())
    assert placement["cpu_fallback"]["nodes"] == [] and placement["nodes_per_ep"]["QNNExecutionProvider"] > 100
    assert payload["verify_source"] == "sentence_encoder:8 check samples"
    assert len(payload["verify_cosines"]) == 8 and payload["verify_min_cosine"] >= 0.999
    assert payload["options"]["soc_model"] == "57" and payload["options"]["htp_arch"] == "75"
    assert payload["precision"] == "a16w8 + fp16 MatMul x4" and payload["simulated"] is BACKEND.simulated
    assert payload["compile_seconds"] > 0
    assert set(payload["versions"]) >= {"onnxruntime", "onnxruntime-qnn", "qnn_sdk", "qnn_sdk_build"}

    # The deployable folder stands alone: reload the context from its final place and run it.
    loaded = BACKEND.load(out / payload["artifact"], threads=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    feeds = FAMILY.samples(tokenizer, ["a man is playing a guitar"], models.SEQ_LEN)
    reference = models.cpu_session(tiny_qdq).run(None, feeds)[0]
    assert models.cosine(loaded.run(feeds), reference) >= 0.999



def test_an_aimet_export_compiles_with_zero_fallback_and_reproduces_the_cpu_ep(tiny_bert, tmp_path):
    pytest.importorskip("aimet_onnx")
    from tasks.recipes.aimet_qnn import AimetQnnSettings

    qdq = models.make_tiny_qdq(tiny_bert, tmp_path / "qdq", AimetQnnSettings(htp_config="htp_v75"))
    payload = run(qdq, "qnn_htp", "snapdragon_8_gen_3", CompileCheckParams(threads=1), QnnHtpCompileParams(),
                  SENTENCE_ENCODER, tmp_path / "compile", key="k", model_dir=tiny_bert)

    assert payload["cpu_fallback_nodes"] == 0 and payload["nodes_per_ep"]["QNNExecutionProvider"] > 100
    assert payload["verify_source"] == "sentence_encoder:8 check samples"
    assert payload["verify_min_cosine"] >= 0.999
    assert payload["precision"].startswith("a16w8")

def test_ffn_layers_at_8_bit_in_a_16_bit_graph_compile_with_zero_fallback(tiny_bert, tmp_path):
    import onnx

    from tasks.recipes.ort_qnn import OrtQnnSettings

    ffn = ["*/intermediate/dense/*", "*/output/dense/*"]  # FFN in and out, and the attention output projection
    qdq = models.make_tiny_qdq(tiny_bert, tmp_path / "qdq", OrtQnnSettings(activations_8bit=ffn))
    graph = onnx.load(str(qdq)).graph
    inits, producers = {i.name: i for i in graph.initializer}, {o: n for n in graph.node for o in n.output}
    linear = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in producers  # weights come dequantized
              and producers[n.input[1]].input[0] in inits]
    bits = {n.name: qdq_bits(graph, n.input[0]) for n in linear}  # the activation each reads
    assert {name: b for name, b in bits.items() if "/dense/" in name} and all(
        b == (8 if "/dense/" in name else 16) for name, b in bits.items()), bits
    # Conversions sit where 8- and 16-bit layers meet; the HTP runs all of it.
    payload = run(qdq, "qnn_htp", "snapdragon_8_gen_3", CompileCheckParams(threads=1), QnnHtpCompileParams(),
                  SENTENCE_ENCODER, tmp_path / "compile", key="k", model_dir=tiny_bert)
    assert payload["cpu_fallback_nodes"] == 0 and payload["verify_min_cosine"] >= 0.999


def test_unsupported_op_trips_the_fallback_gate_naming_ops_and_nodes(unsupported_onnx, tmp_path):
    out = tmp_path / "compile"
    with pytest.raises(StageError) as err:
        run(unsupported_onnx, "qnn_htp", "snapdragon_x_elite", CompileCheckParams(), QnnHtpCompileParams(),
            SENTENCE_ENCODER, out, key="k")
    message = str(err.value)
    assert "1 node(s) fall back to the CPU (max_cpu_fallback_nodes=0)" in message
    assert "Shrink x1" in message and models.BAD_NODE in message
    assert "\n" not in message
    assert not out.exists()  # nothing half-written


def test_real_encoder_fallbacks_are_named_and_trip_the_gate(tiny_bert, tmp_path):
    # The QNN recipe without ORT's QNN pre-pass leaves the Erf-based GELU, which the HTP rejects:
    # the gate and the report must name those nodes (and their Q/DQ) as the source graph names them.
    import onnx

    qdq = models.make_tiny_qdq(tiny_bert, tmp_path / "qdq", qnn_preprocess=False)
    source = {n.name: n.op_type for n in onnx.load(str(qdq)).graph.node}
    erf = [name for name, op in source.items() if op == "Erf"]
    assert len(erf) == 2  # one GELU per layer
    with pytest.raises(StageError) as err:
        run(qdq, "qnn_htp", "snapdragon_8_gen_3", CompileCheckParams(), QnnHtpCompileParams(), SENTENCE_ENCODER,
            tmp_path / "gated", key="k", model_dir=tiny_bert)
    message = str(err.value)
    assert "6 node(s) fall back to the CPU (max_cpu_fallback_nodes=0)" in message and "\n" not in message
    assert "op types DequantizeLinear x2, Erf x2, QuantizeLinear x2;" in message
    assert all(name in message for name in erf)
    assert not (tmp_path / "gated").exists()

    # Allowed, the fallback is recorded node by node and the split model still reproduces the CPU EP.
    params, device = CompileCheckParams(threads=1), QnnHtpCompileParams(max_cpu_fallback_nodes=6)
    payload = run(qdq, "qnn_htp", "snapdragon_8_gen_3", params, device, SENTENCE_ENCODER, tmp_path / "out", key="k",
                  model_dir=tiny_bert)
    placement = json.loads((tmp_path / "out" / "placement.json").read_text())
    fallback = placement["cpu_fallback"]["nodes"]
    assert all(source[n["name"]] == n["op_type"] for n in fallback)
    assert [n["name"] for n in fallback if n["op_type"] == "Erf"] == erf
    assert placement["nodes_per_ep"] == {"QNNExecutionProvider": len(source) - 6, "CPUExecutionProvider": 6}
    assert placement["qnn_partitions"] == 3  # split around the two GELUs
    assert payload["cpu_fallback_op_types"] == {"DequantizeLinear": 2, "Erf": 2, "QuantizeLinear": 2}
    assert payload["verify_min_cosine"] >= 0.999


def test_fallback_within_the_limit_is_recorded_and_verified(unsupported_onnx, tmp_path):
    params, device = CompileCheckParams(threads=1), QnnHtpCompileParams(max_cpu_fallback_nodes=1, embed_context=True)
    out = tmp_path / "compile"
    payload = run(unsupported_onnx, "qnn_htp", "snapdragon_x_elite", params, device, SENTENCE_ENCODER, out, key="k")

    placement = json.loads((out / "placement.json").read_text())
    assert placement["cpu_fallback"]["nodes"] == [{"name": models.BAD_NODE, "op_type": "Shrink"}]
    assert payload["cpu_fallback_op_types"] == {"Shrink": 1}
    assert payload["artifact_files"] == ["model_ctx.onnx"]  # embedded context
    assert payload["options"]["soc_model"] == "60" and payload["options"]["htp_arch"] == "73"
    assert payload["verify_source"].startswith("noise:") and payload["verify_min_cosine"] >= 0.999


def test_verify_inputs_npz_feeds_the_check(unsupported_onnx, tmp_path):
    npz = tmp_path / "feeds.npz"
    np.savez(npz, x=np.linspace(-2, 2, 8 * 16, dtype=np.float32).reshape(8, 16))
    params, device = CompileCheckParams(verify_inputs=npz, threads=1), QnnHtpCompileParams(max_cpu_fallback_nodes=1)
    payload = run(unsupported_onnx, "qnn_htp", "snapdragon_8_gen_3", params, device, SENTENCE_ENCODER, tmp_path / "out",
                  key="k")
    assert payload["verify_source"] == "npz:feeds.npz" and len(payload["verify_cosines"]) == 8

    short = tmp_path / "short.npz"
    np.savez(short, x=np.zeros((3, 16), np.float32))
    with pytest.raises(InputError, match="has 3 rows, verify_count needs 8"):
        params = CompileCheckParams(verify_inputs=short)
        run(unsupported_onnx, "qnn_htp", "snapdragon_8_gen_3", params, device, SENTENCE_ENCODER, tmp_path / "out2",
            key="k")


def test_unknown_soc_is_a_one_line_error_listing_known_socs(tmp_path):
    with pytest.raises(ConfigError) as err:  # before any file is read
        run(tmp_path / "model.onnx", "qnn_htp", "snapdragon_9_gen_9", CompileCheckParams(), QnnHtpCompileParams(),
            SENTENCE_ENCODER, tmp_path / "out", key="k")
    message = str(err.value)
    assert "\n" not in message and "'snapdragon_9_gen_9'" in message
    assert all(name in message for name in QNN_SOCS)
    assert not (tmp_path / "out").exists()


def test_integer_inputs_need_a_tokenizer_or_npz(tiny_qdq, tmp_path):
    with pytest.raises(InputError, match="integer inputs need real verification data"):
        run(tiny_qdq, "qnn_htp", "snapdragon_8_gen_3", CompileCheckParams(), QnnHtpCompileParams(), SENTENCE_ENCODER,
            tmp_path / "out", key="k")


def test_params_are_strict():
    with pytest.raises(ValidationError, match="extra"):
        CompileParams.model_validate({"qnn_htp": {"soc": "SM8650"}})
    with pytest.raises(ValidationError, match="extra"):
        QnnHtpCompileParams.model_validate({"soc": "SM8650"})
    with pytest.raises(ValidationError):
        CompileCheckParams(verify_count=4)
    with pytest.raises(ValidationError):
        CompileParams(verify_count=4)
    custom = QnnHtpCompileParams.model_validate(
        {"targets": {"my_board": {"chipset": "QCS9100", "soc_model": 77, "htp_arch": 73}}}
    )
    assert custom.backend_options("my_board", threads=1)["soc_model"] == 77
    assert QNN_SOCS["snapdragon_8_gen_3"].soc_model == 57 and QNN_SOCS["snapdragon_x_elite"].htp_arch == 73
