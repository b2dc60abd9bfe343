"""Recipe aimet_import: an AIMET export (float ONNX + encodings JSON) made with aimet-onnx in the test, turned
into a QDQ model that compiles for the HTP; bad encodings are one line and leave nothing behind."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from conftest import SENTENCE_ENCODER
from helpers import make_aimet_export, matches_reference, ort_embed

from tasks.core.errors import InputError
from tasks.recipes.aimet_import import AimetImportSettings
from tasks.stages.quantize import QuantizeParams
from tasks.stages.quantize import run as quantize_run

pytest.importorskip("aimet_onnx")


@pytest.fixture(scope="module")
def export(tiny_fixed, calib, tmp_path_factory) -> dict:
    return make_aimet_export(tiny_fixed, calib, tmp_path_factory.mktemp("aimet") / "export")


def _import(tmp_path, model, export_files, name="imported"):
    settings = AimetImportSettings(onnx=str(export_files["onnx"]), encodings=str(export_files["encodings"]))
    out = tmp_path / name
    payload = quantize_run(model=model, calibration=None, variant=name, params=QuantizeParams(variants={name: settings}),
                           family=SENTENCE_ENCODER, out_dir=out, key="k", imports=settings.imports("dense", 16))
    return out, payload


def test_an_aimet_export_becomes_the_qdq_model_the_sim_runs(tmp_path, tiny_fixed, export, eval_feeds):
    out, payload = _import(tmp_path, tiny_fixed, export)

    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "stage.json"]
    encodings = json.loads(export["encodings"].read_text())
    assert payload["encoded_tensors"] == len(encodings["activation_encodings"]) + len(encodings["param_encodings"])
    assert payload["quantize_linear_nodes"] > 20 and payload["int32_biases"] > 0
    assert payload["imported"]["encodings"].endswith("export.encodings")
    imported = ort_embed(out / "model.onnx", eval_feeds)
    # The same encodings as the QuantSim that exported them: the same numbers as its own QDQ model.
    assert matches_reference(imported, ort_embed(export["sim_qdq"], eval_feeds), 0.99999)
    assert matches_reference(imported, ort_embed(tiny_fixed, eval_feeds), 0.99)


@pytest.mark.slow  # the HTP simulator compiles and verifies the context
def test_the_imported_model_compiles_for_the_htp_with_zero_fallback(tmp_path, tiny_bert, tiny_fixed, export):
    from tasks.backends.qnn_htp import BACKEND, QnnHtpCompileParams
    from tasks.stages.compile import CompileCheckParams
    from tasks.stages.compile import run as compile_run

    if BACKEND.unavailable_reason():
        pytest.skip(f"qnn_htp unavailable: {BACKEND.unavailable_reason()}")
    out, _ = _import(tmp_path, tiny_fixed, export)
    payload = compile_run(out / "model.onnx", "qnn_htp", "snapdragon_8_gen_3", CompileCheckParams(threads=1),
                          QnnHtpCompileParams(), SENTENCE_ENCODER, tmp_path / "compile", key="k", model_dir=tiny_bert)
    assert payload["cpu_fallback_nodes"] == 0 and payload["nodes_per_ep"]["QNNExecutionProvider"] > 100
    assert payload["verify_min_cosine"] >= 0.999 and payload["precision"].startswith("a16w8")


def _edited(tmp_path, export, edit) -> dict:
    doc = json.loads(export["encodings"].read_text())
    edit(doc)
    path = tmp_path / "edited.encodings"
    path.write_text(json.dumps(doc))
    return {**export, "encodings": path}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["activation_encodings"][0].update(name="no_such_tensor"),
     "names 1 tensor(s) export.onnx lacks (e.g. 'no_such_tensor'); use the encodings exported with this model"),
    (lambda d: d["activation_encodings"][0].update(bw=12),
     "the HTP runs activation encodings as int8, int16; re-export at a bit width it runs"),
    (lambda d: d["param_encodings"][0].update(bw=2), "the HTP runs param encodings as int4, int8, int16, int32"),
    (lambda d: d.update(version="0.6.1"), "encodings version '0.6.1'; edgeopt reads 1.0.0, 2.0.0, 2.1.0"),
    (lambda d: d["param_encodings"][0].pop("bw"), "malformed 1.0.0 encodings (KeyError"),
])
def test_bad_encodings_are_one_line_and_nothing_is_written(tmp_path, tiny_fixed, export, edit, message):
    with pytest.raises(InputError) as err:
        _import(tmp_path, tiny_fixed, _edited(tmp_path, export, edit))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "imported").exists()


def test_a_model_the_pipeline_cannot_feed_is_refused(tmp_path, tiny_fixed, tiny_onnx32, export):
    # An export of the length-16 graph imported for the length-32 pipeline graph.
    with pytest.raises(InputError, match=r"input input_ids\[1, 16\] is not one the pipeline feeds at this length"):
        _import(tmp_path, tiny_onnx32, export)
    not_json = tmp_path / "notes.encodings"
    not_json.write_text("scale: 0.1\n")
    with pytest.raises(InputError, match="not a JSON encodings file"):
        _import(tmp_path, tiny_fixed, {**export, "encodings": not_json})


def test_placeholders_name_one_export_per_model_and_length(tmp_path, export):
    folder = tmp_path / "dense" / "seq16"
    folder.mkdir(parents=True)
    for f in export["onnx"].parent.glob("export.*"):
        shutil.copy(f, folder / f.name)
    settings = AimetImportSettings(onnx=str(tmp_path / "{model}/seq{seq_len}/export.onnx"),
                                   encodings=str(tmp_path / "{model}/seq{seq_len}/export.encodings"))
    files = settings.imports("dense", 16)
    assert files["onnx"] == folder / "export.onnx" and files["encodings"] == folder / "export.encodings"
    data = [p for role, p in files.items() if role.startswith("onnx_data")]
    referenced = {e.value for t in onnx.load(str(folder / "export.onnx"), load_external_data=False).graph.initializer
                  for e in t.external_data if e.key == "location"}
    assert data and {p.name for p in data} == referenced  # external weights count as inputs too
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \['variant'\]"):
        AimetImportSettings(onnx="x/{variant}.onnx", encodings="x.encodings")
