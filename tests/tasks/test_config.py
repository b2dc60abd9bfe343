"""params.yaml is validated before any stage runs; each mistake gets one clear line."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from tasks.config import EdgeoptConfig, load_config, merge
from tasks.core.errors import ConfigError

BASE = yaml.safe_load((REPO / "params.yaml").read_text())
PAIRS = {"name": "mine", "format": "sentence_pairs", "path": "pairs.csv"}


def _mixed(settings: str, extra: str = "") -> str:
    """params.yaml's variants plus an auto_mixed variant `mixed` with these settings."""
    return (f"{{variants: [{', '.join(BASE['variants'])}, mixed], quantize: {{variants: {{mixed: {settings}}}}}"
            + (f", {extra}" if extra else "") + "}")


def _dynamic(settings: str, extra: str = "", export: bool = True) -> str:
    """params.yaml's variants plus a variant `dyn` with these settings (export_onnx.dynamic on unless `export`)."""
    return (f"{{variants: [{', '.join(BASE['variants'])}, dyn], quantize: {{variants: {{dyn: {settings}}}}}"
            + (", export_onnx: {dynamic: true}" if export else "") + (f", {extra}" if extra else "") + "}")


DYN = "{method: ort_static, shape: dynamic}"


def test_repo_params_load_with_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.seq_lens == [128, 512]
    assert cfg.fetch_model.source == "package" and not cfg.fetch_model.trust_remote_code
    assert cfg.family.name == "sentence_encoder" and cfg.evaluation.names() == ["stsb", "lee50"]
    assert cfg == EdgeoptConfig.model_validate(cfg.model_dump())


def test_a_classifier_family_takes_labelled_text(tmp_path):
    """Families and evaluation formats pair up: a classifier is scored on labelled texts."""
    labelled = {"name": "mine", "format": "labelled_text", "path": "texts.csv", "metric": "macro_f1"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**BASE, "family": {"name": "text_classifier"}, "evaluation": {"sets": [labelled]}}))
    cfg = load_config(path)
    assert cfg.family.name == "text_classifier" and cfg.evaluation.sets[0].metric == "macro_f1"
    path.write_text(yaml.safe_dump({**BASE, "family": {"name": "text_classifier"}, "evaluation": {"sets": [PAIRS]}}))
    with pytest.raises(ConfigError, match="format sentence_pairs cannot score family text_classifier"):
        load_config(path)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("seq_lens: [0]", "seq_lens: lengths must be between 3 and 8192"),
        ("seq_lens: [-5, 128]", "between 3 and 8192"),
        ("seq_lens: [128, 128]", "duplicate lengths"),
        ("seq_lens: []", "seq_lens"),
        ("targets: [{variant: fp32, device: tpu}]", "targets: unknown device(s) ['tpu']"),
        ("targets: [{variant: fp32}]", "targets.0.device: missing; add this section or key"),
        ("targets: [{variant: fp32, device: ort_cpu}, {variant: fp32, device: ort_cpu}]", "listed twice"),
        ("variants: [int3]", "variants: unknown variant(s) ['int3']"),
        ("export_onnx: {opset: seventeen}", "export_onnx.opset"),
        ("benchmark: {timed_runs: 10}", "benchmark.timed_runs"),
        ("benchmark: {threadz: 2}", "benchmark.threadz: unknown key"),
        ("colour: blue", "colour: unknown key"),
        ("fetch_model: {source: path}", "source: path needs fetch_model.path"),
        ("fetch_model: {source: hub, hub_id: x/y}", "pinned fetch_model.revision"),
        ("models: [pruned]", "models: must include 'dense'"),
        ("models: [dense, dense]", "duplicate models"),
        ("models: [dense, Big-One]", "must be lower-case letters"),
        ("models: [dense, tiny]", "models: unknown model(s) ['tiny']"),
        ("report: {accuracy_budget: lots}", "report.accuracy_budget"),
        ("report: {accuracy_budget: .inf}", "report.accuracy_budget: Input should be a finite number"),
        ("compile: {verify_min_cosine: .nan}", "compile.verify_min_cosine: Input should be a finite number"),
        ("targets: [{variant: ort_dynamic_int8, device: ort_cpu}]", "targets: no {variant: fp32, device: ort_cpu}"),
        ("family: {name: image_generator}", "family: Input tag 'image_generator'"),
        ("family: {name: sentence_encoder, pooling: sum}", "family.sentence_encoder.pooling"),
        ("evaluation: {sets: []}", "evaluation.sets"),
        ("evaluation: {sets: [{name: x, format: ranking, path: a.csv}]}", "evaluation.sets.0: Input tag 'ranking'"),
        ("evaluation: {sets: [{name: x, format: labelled_text, path: a.csv}]}",
         "format labelled_text cannot score family sentence_encoder (embedding output)"),
        ("evaluation: {sets: [{name: x, format: sentence_pairs, path: a.csv}, {name: x, format: sentence_pairs, "
         "path: b.csv}]}", "names ['x', 'x'] must be unique"),
        ("calibration_data: {sources: [{path: ../shared/data/stsb/sts-test.csv, format: stsb}]}",
         "calibration_data.sources[0]: ../shared/data/stsb/sts-test.csv is evaluation set 'stsb'"),
        ("compile: {jobs: [{variant: ort_qdq_a16w8, device: qnn_htp, target: snapdragon_9000}]}",
         "compile.jobs[0]: compile.qnn_htp: unknown target SoC 'snapdragon_9000'"),
        ("compile: {jobs: [{variant: fp32, device: gpu, target: host}]}", "device 'gpu' has no compile step"),
        ("sensitivity: {variants: [ov_nncf_int8]}", "'ov_nncf_int8' (method nncf_ptq) cannot keep single layers"),
        ("sensitivity: {variants: [ort_qdq_a8w8_naive]}", "sensitivity.variants: ['ort_qdq_a8w8_naive'] not in variants"),
        ("sensitivity: {axes: {ort_qdq_a8w8: a8}}", "'ort_qdq_a8w8' (method ort_static) is not a uint16 ort_qnn variant"),
        ("sensitivity: {axes: {ort_qdq_a16w8: a8}}", "sensitivity.axes: ['ort_qdq_a16w8'] not in sensitivity.variants"),
        ("sensitivity: {seq_len: 256}", "sensitivity.seq_len: 256 is not one of seq_lens [128, 512]"),
        ("sensitivity: {models: [pruned, huge]}", "sensitivity.models: ['huge'] not in models"),
        (_mixed("{method: auto_mixed, base: ort_dynamic_int8}"),
         "quantize.variants.mixed: its layer groups are chosen by the sensitivity stage of 'ort_dynamic_int8'"),
        (_mixed("{method: auto_mixed, base: nope}"), "quantize.variants.mixed.base: 'nope' is not a variant to build on"),
        (_mixed("{method: auto_mixed, base: ort_qdq_a8w8}", "sensitivity: {probes: [alone]}"), "(with probe `kept`)"),
        (_mixed("{method: auto_mixed, base: ort_qdq_a8w8, budget: .inf}"), "budget"),
        (_dynamic("{method: ort_qnn, shape: dynamic}"),
         "quantize.variants.dyn: method ort_qnn builds static shapes only; remove shape: dynamic"),
        (_dynamic(DYN, export=False), "quantize.variants.dyn: shape: dynamic is built from the dynamic export; "
                                      "set export_onnx.dynamic: true"),
        (_dynamic(DYN, "targets: [{variant: fp32, device: ort_cpu}, {variant: dyn, device: openvino_npu}]"),
         "targets[1]: openvino_npu takes static shapes only; dyn has shape: dynamic"),
        (_dynamic(DYN, "compile: {jobs: [{variant: dyn, device: openvino_cpu, target: host}]}"),
         "compile.jobs[0]: dyn has shape: dynamic"),
        (_dynamic(DYN, "graph_surgery: {float_mask_input: true}"), "graph_surgery.float_mask_input pins the mask"),
        (_dynamic(DYN, "sensitivity: {variants: [dyn]}"), "sensitivity.variants: ['dyn'] have shape: dynamic"),
        (_dynamic(DYN, "bundle: {pinned: {openvino_cpu: [64, 128]}}"),
         "bundle.pinned.openvino_cpu: no target runs a shape: dynamic variant on openvino_cpu"),
        (_dynamic(DYN, "targets: [{variant: fp32, device: ort_cpu}, {variant: dyn, device: ort_cpu}], "
                       "bundle: {pinned: {ort_cpu: [128]}}"), "bundle.pinned.ort_cpu: ort_cpu does not pin"),
        (_dynamic(DYN, "targets: [{variant: fp32, device: ort_cpu}, {variant: dyn, device: openvino_cpu}], "
                       "seq_lens: [128], bundle: {pinned: {openvino_cpu: [16, 64]}}"),
         "bundle.pinned.openvino_cpu: [16, 64] must be distinct, ascending lengths ending at 128"),
        (_dynamic(DYN, "bundle: {precisions: {openvino_cpu: [bf16]}}"),
         "bundle.precisions.openvino_cpu: no target runs a shape: dynamic variant on openvino_cpu"),
        (_dynamic(DYN, "targets: [{variant: fp32, device: ort_cpu}, {variant: dyn, device: ort_cpu}], "
                       "bundle: {precisions: {ort_cpu: [bf16]}}"), "bundle.precisions.ort_cpu: ort_cpu takes no engine precision"),
        (_dynamic(DYN, "targets: [{variant: fp32, device: ort_cpu}, {variant: dyn, device: openvino_cpu}], "
                       "bundle: {precisions: {openvino_cpu: [int3]}}"),
         "bundle.precisions.openvino_cpu: 'int3' is not a precision of openvino_cpu"),
    ],
)
def test_bad_params_give_one_line_naming_the_field(tmp_path, yaml_text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merge(BASE, yaml.safe_load(yaml_text)), sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert expected in message
    assert message.startswith(str(path)) and "\n" not in message


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("seq_lens: [128", "not valid YAML"),
        ("- a\n- b", "top level must be a mapping"),
        ("seq_lens: [128]\nmodels: [dense]\nseq_lens: [512]\n", "line 3: key 'seq_lens' given twice; keep one"),
        ("seq_lens: [128]\n", "evaluation: missing; add this section or key"),
    ],
)
def test_bad_params_files_give_one_line(tmp_path, yaml_text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert expected in message
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_merge_into_params_before_validation(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merge(BASE, {"seq_lens": [128, 512], "benchmark": {"threads": 2, "timed_runs": 60}})))
    cfg = load_config(path, overrides={"seq_lens": [64], "benchmark": {"threads": 1}})
    assert cfg.seq_lens == [64] and cfg.benchmark.threads == 1 and cfg.benchmark.timed_runs == 60
    with pytest.raises(ConfigError, match="benchmark.threads"):
        load_config(path, overrides={"benchmark": {"threads": 0}})


def test_a_mapping_of_another_kind_replaces_the_base_whole():
    base = {"family": {"name": "sentence_encoder", "pooling": "auto"},
            "variants": {"v": {"method": "ort_static", "op_types": ["MatMul"]}, "w": {"method": "none", "x": 1}}}
    merged = merge(base, {"family": {"name": "image_classifier"},
                          "variants": {"v": {"method": "ort_qnn"}, "w": {"y": 2}}})
    assert merged["family"] == {"name": "image_classifier"}
    assert merged["variants"] == {"v": {"method": "ort_qnn"}, "w": {"method": "none", "x": 1, "y": 2}}
