"""Two runs from scratch with the same inputs give byte-identical model artifacts (issue 8).

Each stage that writes a model runs twice into fresh folders; the files must match byte for byte.
docs/operations.md, "Reproducibility", lists what this covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SENTENCE_ENCODER
from tiny_models import WORDS

from tasks.config import load_config
from tasks.core.fingerprint import path_sha256
from tasks.families.sentence_encoder import FAMILY
from tasks.stages.export_onnx import ExportOnnxParams
from tasks.stages.export_onnx import run as export_onnx
from tasks.stages.graph_surgery import GraphSurgeryParams
from tasks.stages.graph_surgery import run as graph_surgery
from tasks.stages.quantize import QuantizeParams, artifact_name
from tasks.stages.quantize import run as quantize

VARIANTS = load_config(REPO / "params.yaml").quantize.variants

SEQ = 16


def _model_files(folder: Path) -> dict[str, str]:
    """sha256 of every file a stage wrote except its stamp (which records timings)."""
    return {p.name: path_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "stage.json"}


@pytest.fixture(scope="module")
def surgery_and_calibration(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    export_onnx(tiny_bert, SEQ, ExportOnnxParams(), SENTENCE_ENCODER, root / "export", key="k")
    graph_surgery(root / "export" / "model.onnx", GraphSurgeryParams(), SENTENCE_ENCODER, root / "surgery", key="k")
    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(12)]
    np.savez(root / "calib.npz", **FAMILY.samples(FAMILY.load_preprocessor(tiny_bert), sentences, SEQ))
    return root


def test_export_and_surgery_are_byte_identical(tiny_bert, surgery_and_calibration, tmp_path):
    root = surgery_and_calibration
    export_onnx(tiny_bert, SEQ, ExportOnnxParams(), SENTENCE_ENCODER, tmp_path / "export", key="k")
    graph_surgery(tmp_path / "export" / "model.onnx", GraphSurgeryParams(), SENTENCE_ENCODER, tmp_path / "surgery",
                  key="k")
    assert _model_files(tmp_path / "export") == _model_files(root / "export")
    assert _model_files(tmp_path / "surgery") == _model_files(root / "surgery")


@pytest.mark.parametrize("variant", ["ort_qdq_a8w8", "ort_qdq_a8w8_allops", "ort_qdq_a16w8", "ort_dynamic_int8", "ov_nncf_int8", "ov_nncf_w8"])
def test_quantized_artifacts_are_byte_identical(surgery_and_calibration, tmp_path, variant):
    root = surgery_and_calibration
    settings = VARIANTS[variant]
    params = QuantizeParams(variants={variant: settings})
    runs = []
    for attempt in ("first", "second"):
        out = tmp_path / attempt
        quantize(model=root / "surgery" / "model.onnx", calibration=root / "calib.npz", variant=variant,
                 params=params, family=SENTENCE_ENCODER, out_dir=out, key="k")
        assert (out / artifact_name(settings)).is_file()
        runs.append(_model_files(out))
    assert runs[0] == runs[1]
