"""Stage compile for ort_cpu: the ORT-optimized graph saved as the artifact, verified and recorded."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
from conftest import SENTENCE_ENCODER
from pydantic import ValidationError

from tasks.backends.ort_cpu import OrtCpuCompileParams
from tasks.config import CompileParams
from tasks.core.fingerprint import is_current, read_stamp
from tasks.core.schemas import COMPILE_ROWS, compile_row
from tasks.stages.compile import CompileCheckParams, run

SEQ = 16

def _record() -> dict:
    return {"model": "dense", "variant": "fp32", "seq_len": SEQ, "dvc_stage": "compile@ort_cpu"}


def test_extended_level_saves_a_fused_portable_graph_that_reproduces_its_source(tiny_onnx, tiny_bert, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "ort"
    payload = run(tiny_onnx, "ort_cpu", "host", CompileCheckParams(threads=1), OrtCpuCompileParams(), SENTENCE_ENCODER,
                  out, key="k", model_dir=tiny_bert, record=_record())

    assert is_current(out, "k") and payload["status"] == "compiled"
    assert set(read_stamp(out)["files"]) == {"model_opt.onnx", "ort_config.json", "placement.json"}
    assert payload["verify_min_cosine"] >= 0.99999 and len(payload["verify_cosines"]) == 8
    assert payload["options"] == {"graph_optimization_level": "extended", "intra_op_num_threads": 1,
                                  "inter_op_num_threads": 1, "execution_mode": "sequential",
                                  "hardware_specific": False}
    assert payload["versions"]["onnxruntime"] == ort.__version__ and payload["precision"] == "fp32"
    assert payload["compile_seconds"] > 0 and payload["cpu_fallback_nodes"] == 0 and payload["npu_nodes"] == 0

    # Every partitioned node is on the CPU EP; the artifact holds ORT's fusions (fewer nodes, contrib ops).
    placement = json.loads((out / "placement.json").read_text())
    assert list(placement["nodes_per_ep"]) == ["CPUExecutionProvider"]
    assert placement["optimized_nodes"] < placement["nodes_total"] <= len(onnx.load(str(tiny_onnx)).graph.node)
    assert {"com.microsoft:SkipLayerNormalization", "com.microsoft:Gelu"} <= set(placement["contrib_op_types"])
    assert placement["layout_op_types"] == {}

    # The artifact stands alone: loaded without re-optimizing, it gives the source's outputs.
    config = json.loads((out / "ort_config.json").read_text())
    assert config["load_with"] == "ORT_DISABLE_ALL" and config["hardware_specific"] is False
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    compiled = ort.InferenceSession(str(out / "model_opt.onnx"), options, providers=["CPUExecutionProvider"])
    source = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    feed = {i.name: np.ones((1, SEQ), np.int64) for i in source.get_inputs()}
    np.testing.assert_allclose(compiled.run(None, feed)[0], source.run(None, feed)[0], atol=1e-5)

    row = COMPILE_ROWS.validate(pd.DataFrame([compile_row(payload)]))
    assert row["status"].iloc[0] == "compiled" and "onnxruntime " in row["engine_versions"].iloc[0]


@pytest.mark.parametrize(("level", "hardware_specific", "fused"), [("disable", False, False), ("all", True, True)])
def test_level_is_recorded_and_above_extended_is_marked_hardware_specific(
    tiny_onnx, tiny_bert, tmp_path, level, hardware_specific, fused
):
    params, device = CompileCheckParams(threads=1), OrtCpuCompileParams(graph_optimization_level=level)
    payload = run(tiny_onnx, "ort_cpu", "host", params, device, SENTENCE_ENCODER, tmp_path / "out", key="k",
                  model_dir=tiny_bert)
    assert payload["options"]["graph_optimization_level"] == level
    assert payload["options"]["hardware_specific"] is hardware_specific
    placement = json.loads((tmp_path / "out" / "placement.json").read_text())
    assert bool(placement["contrib_op_types"]) is fused
    assert payload["verify_min_cosine"] >= 0.99999


def test_unknown_level_is_a_params_error():
    with pytest.raises(ValidationError, match="graph_optimization_level"):
        CompileParams.model_validate({"ort_cpu": {"graph_optimization_level": "max"}})
    with pytest.raises(ValidationError, match="graph_optimization_level"):
        OrtCpuCompileParams.model_validate({"graph_optimization_level": "max"})
