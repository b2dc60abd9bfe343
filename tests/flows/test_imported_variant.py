"""A variant that imports files (an AIMET export per model and length): checked before any stage, keyed into
its quantize stage, and listed in dvc.yaml."""

from __future__ import annotations

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

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
    params["variants"] = [*params["variants"], "imported"]
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
        x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq_len])
        y = helper.make_tensor_value_info("y", TensorProto.INT64, [1, seq_len])
        graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "export", [x], [y])
        onnx.save(helper.make_model(graph), importing / "exports" / f"dense-{seq_len}.onnx")
        (importing / "exports" / f"dense-{seq_len}.encodings").write_text(f'{{"version": "1.0.0", "n": {seq_len}}}')
    for seq_len in (16, 32):  # the stage's own input (its content is all the key reads)
        surgery = importing / "artifacts" / "graph_surgery" / "dense" / f"seq{seq_len}"
        surgery.mkdir(parents=True)
        (surgery / "model.onnx").write_bytes(b"graph %d" % seq_len)
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
