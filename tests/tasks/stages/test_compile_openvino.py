"""Stage compile for the OpenVINO devices: a verified CPU blob, and an NPU that is a skip status here."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import SENTENCE_ENCODER

from tasks.backends._openvino import OpenVinoCompileParams
from tasks.backends.openvino_cpu import OpenVinoCpuCompileParams
from tasks.core.fingerprint import is_current, read_stamp
from tasks.core.schemas import COMPILE_ROWS, compile_row
from tasks.stages.compile import CompileCheckParams, run

SEQ = 16

def _record(device: str) -> dict:
    return {"model": "dense", "variant": "fp32", "seq_len": SEQ, "dvc_stage": f"compile@{device}"}


def test_openvino_cpu_blob_is_compiled_verified_and_reported(tiny_onnx, tiny_bert, tmp_path):
    out = tmp_path / "cpu"
    payload = run(tiny_onnx, "openvino_cpu", "host", CompileCheckParams(threads=1), OpenVinoCpuCompileParams(),
                  SENTENCE_ENCODER, out, key="k", model_dir=tiny_bert, record=_record("cpu"))

    assert is_current(out, "k") and payload["status"] == "compiled"
    assert set(read_stamp(out)["files"]) == {"model.blob", "model.xml", "model.bin", "ov_config.json", "placement.json"}
    assert payload["verify_min_cosine"] >= 0.99999 and len(payload["verify_cosines"]) == 8
    assert 0 < payload["cached_compile_seconds"] < payload["compile_seconds"]
    assert payload["cpu_fallback_nodes"] == 0 and payload["npu_nodes"] == 0 and payload["simulated"] is False
    assert payload["options"]["INFERENCE_PRECISION_HINT"] == "f32"
    row = COMPILE_ROWS.validate(pd.DataFrame([compile_row(payload)]))
    assert row["status"].iloc[0] == "compiled" and row["compile_s"].iloc[0] > 0


def test_a_cpu_target_names_its_own_precision_and_a_wrong_one_is_one_line(tiny_onnx, tiny_bert, tmp_path):
    """host_bf16 compiles the same IR with INFERENCE_PRECISION_HINT bf16 (a second benchmarked target beside
    host's f32); the plugin runs it in bf16 where the CPU has avx512_bf16 or AMX, and says so."""
    from tasks.backends.openvino_cpu import BACKEND
    from tasks.core.errors import ConfigError
    from tasks.core.machine import host_cpu

    out = tmp_path / "bf16"
    payload = run(tiny_onnx, "openvino_cpu", "host_bf16", CompileCheckParams(threads=1), OpenVinoCpuCompileParams(),
                  SENTENCE_ENCODER, out, key="k", model_dir=tiny_bert, record=_record("cpu"))
    assert payload["status"] == "compiled" and payload["options"]["INFERENCE_PRECISION_HINT"] == "bf16"
    flags = (host_cpu()[1] or "").split()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert BACKEND.load(out / "model.blob", threads=1).precision == "bf16"
    with pytest.raises(ConfigError, match="unknown target 'host_int3'; use host"):
        OpenVinoCpuCompileParams().check_target("host_int3")


def test_openvino_npu_without_a_driver_is_a_skip_with_a_ready_bundle(tiny_onnx, tiny_bert, tmp_path):
    from tasks.backends.openvino_npu import BACKEND

    if BACKEND.unavailable_reason() is None:
        pytest.skip("this machine has an Intel NPU: the skip path does not apply")
    out = tmp_path / "npu"
    payload = run(tiny_onnx, "openvino_npu", "intel_core_ultra", CompileCheckParams(), OpenVinoCompileParams(),
                  SENTENCE_ENCODER, out, key="k", model_dir=tiny_bert, record=_record("npu"))

    assert payload["status"].startswith("skipped: OpenVINO device NPU not present")
    assert "\n" not in payload["status"] and payload["artifact"] is None
    assert is_current(out, "k")
    assert set(read_stamp(out)["files"]) >= {"model.xml", "model.bin", "npu_config.json"}
    config = json.loads((out / "npu_config.json").read_text())
    assert config["device"] == "NPU" and config["config"]["NPU_TURBO"] is True
    assert payload["options"] == config["config"] and payload["versions"]["openvino"].startswith("20")
    row = COMPILE_ROWS.validate(pd.DataFrame([compile_row(payload)]))
    assert row["npu_nodes"].isna().all() and row["status"].iloc[0].startswith("skipped: ")
    assert row["engine_versions"].iloc[0].startswith("openvino 20")
