"""Transformer graph facts for quantization (tasks.families.transformer_graph) on a tiny random BERT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tiny_models import ARCHITECTURES

from tasks.families.transformer_graph import smooth_layernorm_outputs
from tasks.recipes.base import calibration_feeds

SEQ = 16



def test_layernorm_smoothing_is_exact_and_shrinks_outliers(tmp_path, tiny_fixed, calib):
    import onnxruntime as ort

    feeds = calibration_feeds(calib, tiny_fixed, None)
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


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_layer_groups_of_every_architecture_fuse_attention_inputs(architecture, tmp_path_factory):
    """Per layer: attention's input projections as one group, its output, FFN in and out (ELECTRA adds its
    embedding projection), in graph order, each selected by its module pattern."""
    from conftest import SENTENCE_ENCODER
    from tiny_models import make_tiny_encoder

    from tasks.families.transformer_graph import TransformerGraphHints
    from tasks.stages.export_onnx import ExportOnnxParams
    from tasks.stages.export_onnx import run as export_onnx

    folder = tmp_path_factory.mktemp(architecture)
    export_onnx(make_tiny_encoder(folder / "model", architecture), SEQ, ExportOnnxParams(), SENTENCE_ENCODER,
                folder / "onnx", key="t")
    groups = TransformerGraphHints().layer_groups(folder / "onnx" / "model.onnx")
    fused = [g for g in groups if len(g.nodes) == 3]
    assert len(fused) == 2 and all("+" in g.name for g in fused)  # one q+k+v group per layer (2 layers)
    assert len(groups) == 2 * 4 + (architecture == "electra")
    assert all(g.patterns and g.macs > 0 for g in groups)
    nodes = [n for g in groups for n in g.nodes]
    assert len(nodes) == len(set(nodes)) == 2 * 6 + (architecture == "electra")
