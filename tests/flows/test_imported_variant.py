"""A variant that imports files (an AIMET export per model and length): checked before any stage, keyed into
its quantize stage, and listed in dvc.yaml."""

from __future__ import annotations

import pytest
import yaml

from flows import dvc_yaml, stages
from tasks.config import load_config
from tasks.core.errors import InputError


@pytest.fixture
def importing(workspace):
    """The workspace with variant `imported`: an AIMET export per length under exports/."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["quantize"]["variants"]["imported"] = {"method": "aimet_import",
                                                   "onnx": "exports/{model}-{seq_len}.onnx",
                                                   "encodings": "exports/{model}-{seq_len}.encodings"}
    params["variants"] = ["fp32", "imported"]
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (workspace / "exports").mkdir()
    return workspace


def test_missing_export_files_stop_the_run_before_any_stage(importing):
    cfg = load_config(importing / "params.yaml")
    with pytest.raises(InputError, match=r"exports/dense-16.onnx: not found; fix quantize.variants.imported.onnx "
                                         r"\(dense, 16\) in params.yaml"):
        stages.preflight(cfg)


def test_each_instance_is_keyed_by_its_own_export_and_dvc_lists_them(importing):
    for seq_len in (16, 32):
        for suffix in ("onnx", "encodings"):
            (importing / "exports" / f"dense-{seq_len}.{suffix}").write_text(f"{seq_len} {suffix}")
    cfg = load_config(importing / "params.yaml")
    stages.preflight(cfg)
    call16, call32 = (stages.quantize(cfg, "dense", "imported", n) for n in (16, 32))
    assert call16.args["imports"]["encodings"].as_posix() == "exports/dense-16.encodings"
    keys = (call16.key, call32.key)

    (importing / "exports" / "dense-16.encodings").write_text("edited")
    again16, again32 = (stages.quantize(cfg, "dense", "imported", n) for n in (16, 32))
    assert again16.key != keys[0] and again32.key == keys[1]  # only the instance whose export changed reruns
    assert stages.quantize(cfg, "dense", "fp32", 16).watch == {}

    deps = dvc_yaml.document(cfg)["stages"]["quantize"]["deps"]
    assert {f"exports/dense-{n}.{s}" for n in (16, 32) for s in ("onnx", "encodings")} <= set(deps)
