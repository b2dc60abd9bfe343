"""Quantization graph rewrites (tasks.transforms.quant_rewrites) on a tiny random BERT: exact in float."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import ort_embed

from tasks.transforms.quant_rewrites import linear_layers_as_gemm

SEQ = 16



def test_linear_layers_as_gemm_is_exact(tmp_path, tiny_fixed, eval_feeds):
    out = tmp_path / "gemm.onnx"
    assert linear_layers_as_gemm(tiny_fixed, out) == 12  # 2 layers x (q, k, v, out, ffn in, ffn out)
    graph = onnx.load(out).graph
    constant = {i.name for i in graph.initializer}
    assert sum(n.op_type == "Gemm" for n in graph.node) == 12
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constant]
    np.testing.assert_allclose(ort_embed(out, eval_feeds), ort_embed(tiny_fixed, eval_feeds), atol=1e-5)
