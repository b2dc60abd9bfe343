"""What every recipe shares (tasks.recipes.base): the float-min mask refusal and the calibration feeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import SENTENCE_ENCODER
from helpers import matches_reference, ort_embed, quantize_variant

from tasks.config import load_config
from tasks.core.errors import InputError
from tasks.core.feeds import build_feeds
from tasks.recipes.ort_qnn import OrtQnnSettings
from tasks.recipes.ort_static import OrtStaticSettings

SEQ = 16
REPO = Path(__file__).resolve().parents[3]
VARIANTS = load_config(REPO / "params.yaml").quantize.variants  # the project's variants

def test_ort_static_refuses_float_min_mask_without_floor(tmp_path, tiny_onnx, calib):
    for settings in (OrtStaticSettings(), OrtStaticSettings(calibrate_method="Entropy", softmax_input_floor=-20),
                     OrtQnnSettings()):
        with pytest.raises(InputError, match="run graph_surgery"):
            quantize_variant(tmp_path, tiny_onnx, calib, "raw", settings)


def test_float_mask_surgery_model_gets_bias_feeds(tmp_path, tiny_onnx, calib, eval_feeds):
    """A graph_surgery float_mask_input model calibrates from the same tokenizer npz."""
    from tasks.stages.graph_surgery import GraphSurgeryParams
    from tasks.stages.graph_surgery import run as surgery

    surgery(tiny_onnx, GraphSurgeryParams(float_mask_input=True), SENTENCE_ENCODER, tmp_path / "s", key="k")
    model = tmp_path / "s" / "model.onnx"
    out, payload = quantize_variant(tmp_path, model, calib, "bias", VARIANTS["ort_qdq_a8w8"])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "attention_bias" in {i.name for i in session.get_inputs()}
    got = np.concatenate([
        session.run(["embedding"], build_feeds(session, {k: v[i : i + 1] for k, v in eval_feeds.items()}))[0]
        for i in range(len(eval_feeds["input_ids"]))
    ])
    assert matches_reference(got, ort_embed(tiny_onnx, eval_feeds), 0.98)
