"""Dynamic-shape artifacts on a tiny BERT: exported with a free token axis, surgery and quantization keep it
free, calibration runs each input at its own length, and the artifacts agree with the static model on the
same tokens (padding is masked out)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SENTENCE_ENCODER
from helpers import matches_reference, quantize_variant, sentences

from tasks.builders.calibration import save_npz
from tasks.core.errors import InputError
from tasks.core.calibration_arrays import ROW_LENGTHS
from tasks.families.sentence_encoder import FAMILY
from tasks.recipes.base import RaggedFeeds, calibration_feeds, row
from tasks.recipes.nncf_ptq import NncfPtqSettings
from tasks.recipes.ort_static import OrtStaticSettings
from tasks.stages import graph_surgery
from tasks.stages.graph_surgery import GraphSurgeryParams

SEQ = 32


def own_length(model, tokenizer, texts: list[str]) -> np.ndarray:
    """`model` (an ORT session or OpenVINO compiled model) run on each text alone at its own token count."""
    out = []
    for text in texts:
        n = int(FAMILY.input_lengths(tokenizer, [text])[0])
        feeds = FAMILY.samples(tokenizer, [text], n)
        if isinstance(model, ort.InferenceSession):
            names = {i.name for i in model.get_inputs()}
            out.append(model.run(None, {k: v for k, v in feeds.items() if k in names})[0][0])
        else:
            out.append(model(feeds)[0][0])
    return np.stack(out)


def padded(path, tokenizer, texts: list[str]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = FAMILY.samples(tokenizer, texts, SEQ)
    return np.concatenate([session.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(len(texts))])


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return FAMILY.load_preprocessor(tiny_bert)


@pytest.fixture(scope="module")
def surgery(tiny_dynamic, tmp_path_factory):
    out = tmp_path_factory.mktemp("surgery") / "seq32"
    payload = graph_surgery.run(tiny_dynamic / "model.onnx", GraphSurgeryParams(), SENTENCE_ENCODER, out, key="s",
                                dynamic_model=tiny_dynamic / "model_dynamic.onnx")
    return out, payload


@pytest.fixture(scope="module")
def rows_npz(tokenizer, tmp_path_factory):
    """The calibration_data stage's one-input-per-row file at 32 tokens (12 sentences)."""
    texts = sentences(12, 7)
    arrays = FAMILY.samples(tokenizer, texts, SEQ)
    path = tmp_path_factory.mktemp("calib") / "calib_rows_seq32.npz"
    save_npz(path, {**arrays, ROW_LENGTHS: np.minimum(FAMILY.input_lengths(tokenizer, texts), SEQ)})
    return path


def test_the_dynamic_export_takes_any_length_and_matches_the_static_one(tiny_dynamic, tokenizer):
    model = onnx.load(tiny_dynamic / "model_dynamic.onnx")
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert all(d[1] == "shape" for d in dims.values()), dims
    texts = sentences(6, 11)
    lengths = FAMILY.input_lengths(tokenizer, texts)
    assert len(set(lengths.tolist())) > 2  # really different lengths
    session = ort.InferenceSession(str(tiny_dynamic / "model_dynamic.onnx"), providers=["CPUExecutionProvider"])
    got = own_length(session, tokenizer, texts)
    static = padded(tiny_dynamic / "model.onnx", tokenizer, texts)
    np.testing.assert_allclose(got, static, atol=2e-5)
    assert matches_reference(got, static, 0.9999)


def test_surgery_rewrites_the_dynamic_model_alike_and_keeps_it_dynamic(surgery, tiny_dynamic, tokenizer):
    out, payload = surgery
    assert payload["dynamic"]["verify_min_cosine"] > 0.99999
    assert payload["dynamic"]["transformations"].keys() == payload["transformations"].keys()
    texts = sentences(5, 12)
    before = own_length(ort.InferenceSession(str(tiny_dynamic / "model_dynamic.onnx")), tokenizer, texts)
    after = own_length(ort.InferenceSession(str(out / "model_dynamic.onnx")), tokenizer, texts)
    assert matches_reference(after, before, 0.99999)


def test_calibration_rows_are_cut_to_their_own_length_for_a_dynamic_model(surgery, rows_npz, calib, tiny_dynamic):
    out, _ = surgery
    feeds = calibration_feeds(rows_npz, out / "model_dynamic.onnx", None)
    assert isinstance(feeds, RaggedFeeds) and feeds.axis == 1
    with np.load(rows_npz) as npz:
        lengths = npz[ROW_LENGTHS]
    assert [row(feeds, i)["input_ids"].shape for i in range(len(lengths))] == [(1, int(n)) for n in lengths]
    assert all(row(feeds, i)["attention_mask"].all() for i in range(len(lengths)))  # no padding left
    # A static model reads the same file as padded rows; a dynamic one refuses a packed file (no lengths).
    assert not isinstance(calibration_feeds(rows_npz, tiny_dynamic / "model.onnx", None), RaggedFeeds)
    with pytest.raises(InputError, match="has a free shape axis but this npz has no row_lengths"):
        calibration_feeds(calib, out / "model_dynamic.onnx", None)


@pytest.mark.parametrize("settings", [
    OrtStaticSettings(activation_type="uint8", weight_type="int8", per_channel=True, op_types=["MatMul", "Gemm"],
                      gemm_linear_layers=True, float_output_op_types=["MatMul", "Gemm"], activation_matmuls=False,
                      shape="dynamic"),
    NncfPtqSettings(subset_size=100, shape="dynamic"),
], ids=["ort_qdq_a8w8", "nncf_ptq"])
def test_quantized_dynamic_artifacts_run_each_input_at_its_own_length(settings, surgery, rows_npz, tiny_dynamic,
                                                                      tokenizer, tmp_path):
    out, _ = surgery
    folder, payload = quantize_variant(tmp_path, out / "model_dynamic.onnx", rows_npz, "dyn", settings)
    assert payload["calibration_rows"] == 12
    texts = sentences(6, 13)
    reference = own_length(ort.InferenceSession(str(tiny_dynamic / "model_dynamic.onnx")), tokenizer, texts)
    if settings.method == "ort_static":
        graph = onnx.load(folder / "model.onnx").graph
        assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 0
        assert {n.op_type for n in graph.node} >= {"Gemm", "Shape"}  # linear layers flattened at run time
        got = own_length(ort.InferenceSession(str(folder / "model.onnx")), tokenizer, texts)
    else:
        import openvino as ov

        assert payload["fake_quantize_ops"] > 10
        compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = own_length(compiled, tokenizer, texts)
    assert matches_reference(got, reference, 0.97)


def test_transformer_fusion_cuts_the_graph_and_keeps_it_dynamic(surgery, tiny_dynamic, tokenizer, tmp_path):
    """ONNX Runtime's BERT fusions before dynamic quantization: a fraction of the nodes, still any length, and the
    same embeddings within int8 noise."""
    from tasks.recipes.ort_dynamic import OrtDynamicSettings

    out, _ = surgery
    settings = OrtDynamicSettings(per_channel=True, transformer_fusion="bert", shape="dynamic")
    folder, payload = quantize_variant(tmp_path, out / "model_dynamic.onnx", None, "fused", settings)
    assert payload["fused_operators"]["Attention"] == 2 and payload["fused_operators"]["SkipLayerNormalization"] == 4
    fused = onnx.load(folder / "model.onnx").graph
    assert len(fused.node) < len(onnx.load(out / "model_dynamic.onnx").graph.node) / 2  # quantization nodes included
    texts = sentences(6, 14)
    reference = own_length(ort.InferenceSession(str(tiny_dynamic / "model_dynamic.onnx")), tokenizer, texts)
    assert matches_reference(own_length(ort.InferenceSession(str(folder / "model.onnx")), tokenizer, texts), reference, 0.97)
