"""params.yaml is validated before any stage runs; each mistake gets one clear line."""

from __future__ import annotations

import pytest

from tasks.config import EdgeoptConfig, load_config
from tasks.errors import ConfigError

from conftest import REPO


def test_repo_params_load_with_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.seq_lens == [128, 512]
    assert cfg.fetch_model.source == "package" and not cfg.fetch_model.trust_remote_code
    assert cfg == EdgeoptConfig.model_validate(cfg.model_dump())


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("seq_lens: [0]", "seq_lens: sequence lengths must be between 1 and 8192"),
        ("seq_lens: [-5, 128]", "between 1 and 8192"),
        ("seq_lens: [128, 128]", "duplicate sequence lengths"),
        ("seq_lens: []", "seq_lens"),
        ("targets: [{variant: fp32, device: tpu}]", "targets: unknown device(s) ['tpu']"),
        ("targets: [{variant: fp32}]", "targets.0.device: Field required"),
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
        ("seq_lens: [128", "not valid YAML"),
        ("- a\n- b", "top level must be a mapping"),
    ],
)
def test_bad_params_give_one_line_naming_the_field(tmp_path, yaml_text, expected):
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
    path.write_text("seq_lens: [128, 512]\nbenchmark: {threads: 2, timed_runs: 60}\n")
    cfg = load_config(path, overrides={"seq_lens": [64], "benchmark": {"threads": 1}})
    assert cfg.seq_lens == [64] and cfg.benchmark.threads == 1 and cfg.benchmark.timed_runs == 60
    with pytest.raises(ConfigError, match="benchmark.threads"):
        load_config(path, overrides={"benchmark": {"threads": 0}})
