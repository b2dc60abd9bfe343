"""QNN HTP backend on the HTP simulator: compile to an EPContext model, place, load, run.

The fixtures here (a tiny QDQ a16w8 BERT and a float graph with an op QNN rejects) are reused by
tests/tasks/stages/test_compile_qnn_htp.py; they belong in tests/tiny_models.py once that file can take them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import WORDS

SEQ_LEN = 16
SOC_8_GEN_3 = {"soc_model": 57, "htp_arch": 75}
BAD_NODE = "bad_shrink"  # Shrink is not in the QNN EP's supported-operator list


def _backend():
    from tasks.backends.qnn_htp import BACKEND

    reason = BACKEND.unavailable_reason()
    if reason:
        pytest.skip(f"qnn_htp unavailable: {reason}")
    return BACKEND


def clamp_mask_fill(model, fill: float = 1e4) -> int:
    """Replace float constants beyond +-1e30 (the export's float-min attention-mask fill) by +-fill:
    a 16-bit activation scale stretched to 3.4e38 would round every real value to zero."""
    from onnx import numpy_helper

    def fix(tensor) -> int:
        a = numpy_helper.to_array(tensor)
        if a.dtype.kind != "f" or not a.size or np.abs(a).max() <= 1e30:
            return 0
        clamped = np.where(np.abs(a) > 1e30, np.sign(a) * fill, a).astype(a.dtype)
        tensor.CopyFrom(numpy_helper.from_array(clamped, tensor.name))
        return 1

    n = sum(fix(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            n += sum(fix(a.t) for a in node.attribute if a.name == "value")
    return n


def tiny_sentences(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]


def make_tiny_qdq(model_dir: Path, folder: Path, settings=None, **recipe) -> Path:
    """Export the tiny encoder (static [1, 16]) and quantize it with `settings`, by default the project's QNN
    recipe (tasks.recipes.ort_qnn, `OrtQnnSettings(**recipe)`); e.g. `qnn_preprocess=False` leaves ops the HTP
    rejects (the Erf GELU, the mask's Shape/Expand chain)."""
    import onnx
    from transformers import AutoTokenizer

    from tasks.families.sentence_encoder import FAMILY, SentenceEncoderSettings
    from tasks.recipes.ort_qnn import OrtQnnSettings
    from tasks.stages.export_onnx import ExportOnnxParams
    from tasks.stages.export_onnx import run as export_run
    from tasks.stages.quantize import QuantizeParams
    from tasks.stages.quantize import run as quantize_run

    family = SentenceEncoderSettings()
    export_run(model_dir, SEQ_LEN, ExportOnnxParams(), family, folder / "fp32", key="test")
    fp32 = onnx.load(str(folder / "fp32" / "model.onnx"))
    assert clamp_mask_fill(fp32) >= 1
    onnx.save(fp32, str(folder / "clamped.onnx"))
    feeds = FAMILY.samples(AutoTokenizer.from_pretrained(model_dir), tiny_sentences(16), SEQ_LEN)
    np.savez(folder / "calibration.npz", **feeds)
    params = QuantizeParams(variants={"qnn": settings or OrtQnnSettings(**recipe)})
    quantize_run(model=folder / "clamped.onnx", calibration=folder / "calibration.npz", variant="qnn",
                 params=params, family=family, out_dir=folder / "qdq", key="test")
    return folder / "qdq" / "model.onnx"


def make_unsupported_graph(path: Path) -> Path:
    """x[1,16] -> Add -> Shrink (no QNN support) -> Mul -> y: two QNN partitions around one CPU node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Add", ["x", "b"], ["h1"], name="add_in"),
        helper.make_node("Shrink", ["h1"], ["h2"], name=BAD_NODE, lambd=0.5),
        helper.make_node("Mul", ["h2", "s"], ["y"], name="mul_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [
            numpy_helper.from_array(np.full((1, 16), 0.25, np.float32), "b"),
            numpy_helper.from_array(np.full((1, 16), 2.0, np.float32), "s"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_qdq(tiny_bert, tmp_path_factory) -> Path:
    return make_tiny_qdq(tiny_bert, tmp_path_factory.mktemp("qdq"))


@pytest.fixture(scope="module")
def unsupported_onnx(tmp_path_factory) -> Path:
    return make_unsupported_graph(tmp_path_factory.mktemp("bad") / "shrink.onnx")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cpu_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_compile_places_whole_qdq_model_on_htp_and_context_reproduces_cpu(tiny_qdq, tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    from tasks.families.sentence_encoder import FAMILY

    backend = _backend()
    result = backend.compile(tiny_qdq, tmp_path, SOC_8_GEN_3)

    assert result["artifact"] == "model_ctx.onnx"
    assert result["files"] == ["model_ctx.onnx", "model_ctx_qnn.bin"]
    assert all((tmp_path / f).stat().st_size > 0 for f in result["files"])
    placement = result["placement"]
    assert placement["cpu_fallback"] == {"count": 0, "op_types": {}, "nodes": []}
    assert placement["nodes_per_ep"]["QNNExecutionProvider"] == placement["nodes_total"] > 100
    assert placement["qnn_partitions"] == 1
    assert result["precision"] == "a16w8 + fp16 MatMul x4"  # attention's Q.K^T and P.V per layer
    assert result["options"]["soc_model"] == "57" and result["options"]["offload_graph_io_quantization"] == "0"
    assert result["versions"]["qnn_sdk_build"].startswith("v" + result["versions"]["qnn_sdk"])
    assert result["versions"]["ep_compatibility_info"].split(":")[4:6] == ["75", "57"]  # htp_arch, soc_model

    loaded = backend.load(tmp_path / result["artifact"], threads=1)
    assert loaded.simulated is backend.simulated
    assert "a16w8" in loaded.precision and ("simulator" in loaded.precision) == backend.simulated
    assert loaded.placement == {"QNNExecutionProvider": 1} and loaded.cpu_nodes == []

    feeds = FAMILY.samples(AutoTokenizer.from_pretrained(tiny_bert), tiny_sentences(8), SEQ_LEN)
    reference = cpu_session(tiny_qdq)
    for i in range(8):
        feed = {k: v[i : i + 1] for k, v in feeds.items()}
        got = loaded.run(feed)
        assert got.shape == (1, 32)
        assert cosine(got, reference.run(None, feed)[0]) >= 0.999


def test_unsupported_op_is_reported_by_name_and_runs_on_cpu_only_when_baked_in(unsupported_onnx, tmp_path):
    backend = _backend()
    result = backend.compile(unsupported_onnx, tmp_path, {**SOC_8_GEN_3, "embed_context": True})

    assert result["files"] == ["model_ctx.onnx"]  # context embedded: one deployable file
    placement = result["placement"]
    assert placement["cpu_fallback"] == {
        "count": 1,
        "op_types": {"Shrink": 1},
        "nodes": [{"name": BAD_NODE, "op_type": "Shrink"}],
    }
    assert placement["nodes_per_ep"] == {"QNNExecutionProvider": 2, "CPUExecutionProvider": 1}
    assert placement["qnn_partitions"] == 2
    assert result["precision"] == "fp16"

    # The compiled artifact carries its accepted fallback node; it runs (fp16 on HTP) close to fp32 CPU.
    loaded = backend.load(tmp_path / result["artifact"], threads=1)
    assert loaded.cpu_nodes == [BAD_NODE] and "1 CPU fallback" in loaded.precision
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    assert cosine(loaded.run({"x": x}), cpu_session(unsupported_onnx).run(None, {"x": x})[0]) >= 0.999

    # The uncompiled model is refused: load never lets the CPU EP take nodes silently.
    from tasks.core.errors import StageError

    with pytest.raises(StageError, match="fallback to CPU EP has been explicitly disabled"):
        backend.load(unsupported_onnx, threads=1)


def test_compile_rejects_incomplete_options(tiny_qdq, tmp_path):
    backend = _backend()
    with pytest.raises(ValueError, match="htp_arch"):
        backend.compile(tiny_qdq, tmp_path, {"soc_model": 57})
    with pytest.raises(ValueError, match="unknown options"):
        backend.compile(tiny_qdq, tmp_path, {**SOC_8_GEN_3, "soc": "SM8650"})
