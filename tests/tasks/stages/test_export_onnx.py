"""export_onnx: static shapes, the whole embedder in the graph, verified against torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SENTENCE_ENCODER

from tasks.core.errors import InputError, StageError
from tasks.families.sentence_encoder import FAMILY
from tasks.stages.export_onnx import ExportOnnxParams, run


def test_static_shapes_and_normalised_embedding(tiny_bert, tmp_path):
    payload = run(tiny_bert, 24, ExportOnnxParams(), SENTENCE_ENCODER, tmp_path / "out", key="k")
    model = onnx.load(tmp_path / "out" / "model.onnx")
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes == {name: [1, 24] for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert [o.name for o in model.graph.output] == ["embedding"]
    assert payload["verify_max_abs_err"] < 1e-4 and payload["verify_min_cosine"] > 0.9999
    assert (payload["pooling"], payload["normalize"]) == ("mean", True)

    feeds = FAMILY.samples(FAMILY.load_preprocessor(tiny_bert), ["a man is playing a guitar"], 24)
    emb = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, feeds)[0]
    assert emb.shape == (1, 32)
    assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)


def test_disagreement_with_torch_fails_loudly(tiny_bert, tmp_path):
    # No real export matches torch to 1e-12; the check must refuse it and leave nothing behind.
    strict = ExportOnnxParams(verify_max_abs_err=1e-12)
    with pytest.raises(StageError, match="ONNX disagrees with torch"):
        run(tiny_bert, 16, strict, SENTENCE_ENCODER, tmp_path / "out", key="k")
    assert not (tmp_path / "out").exists()


def test_sequence_longer_than_the_model_supports(tiny_bert, tmp_path):
    with pytest.raises(InputError, match=r"seq_lens: 65 exceeds what the model takes \(64\)"):
        run(tiny_bert, 65, ExportOnnxParams(), SENTENCE_ENCODER, tmp_path / "out", key="k")
