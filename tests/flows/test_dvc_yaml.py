"""dvc.yaml and the flow describe the same stages, code, params and output paths, and the code of a stage
is its import closure: computed, never listed by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from dvc.repo import Repo

from flows import dvc_yaml, stages
from tasks.backends import BACKENDS
from tasks.config import load_config
from tasks.core import fingerprint
from tasks.core.code_deps import code_files
from tasks.core.errors import StageError
from tasks.recipes import RECIPES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "params.yaml")


@pytest.fixture(scope="module")
def dvc_stages():
    with Repo(str(REPO)) as repo:
        return {s.addressing: s for s in repo.index.stages}


@pytest.fixture(scope="module")
def flow_calls(cfg):
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return {c.name: c for c in stages.all_calls(cfg)}
    finally:
        os.chdir(cwd)


def test_committed_dvc_yaml_is_the_generated_one(cfg):
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml.render(cfg), "run `edgeopt dvc-yaml`"


def test_same_stage_instances(dvc_stages, flow_calls):
    assert set(dvc_stages) == set(flow_calls)


def test_code_is_the_import_closure():
    """The reference stage runs build_feeds (tasks/core/feeds.py) only through the ORT CPU backend: the
    closure finds it; the compile stage of one device does not depend on another device's module."""
    reference = stages.stage_code("reference", BACKENDS.module_of("ort_cpu"))
    assert "tasks/core/feeds.py" in reference and "tasks/backends/ort_cpu.py" in reference
    qnn = stages.stage_code("compile", BACKENDS.module_of("qnn_htp"))
    assert "tasks/backends/qnn_htp.py" in qnn and "tasks/backends/_openvino.py" not in qnn
    ov = stages.stage_code("compile", BACKENDS.module_of("openvino_cpu"))
    assert {"tasks/backends/openvino_cpu.py", "tasks/backends/_openvino.py"} <= set(ov)
    # A package's __init__ runs when any module of it is imported: part of the closure.
    assert "tasks/stages/__init__.py" in qnn and "tasks/__init__.py" in qnn
    assert code_files(["tasks.core.errors"]) == ["tasks/__init__.py", "tasks/core/__init__.py", "tasks/core/errors.py"]


def test_same_outputs_and_code_deps(dvc_stages, flow_calls):
    registry_code = set()
    for registry in (RECIPES, BACKENDS):
        for name in registry.names():
            registry_code |= set(code_files([registry.module_of(name)]))
    for name, call in flow_calls.items():
        stage = dvc_stages[name]
        outs = {Path(o.def_path) for o in stage.outs}
        assert outs == {call.out_dir}, name
        deps = {Path(d.def_path) for d in stage.deps}
        assert {Path(f) for f in call.code} <= deps, f"{name}: dvc.yaml misses code deps"
        # DVC cannot choose a recipe or device per matrix item: it may list the other ones' code.
        code_deps = {d for d in deps if d.parts[0] == "tasks"}
        extra = code_deps - {Path(f) for f in call.code}
        assert extra <= {Path(f) for f in registry_code}, f"{name}: dvc.yaml lists code the flow does not hash: {extra}"
        # fetch_model's source lives outside the project (site-packages, a hub cache): DVC tracks
        # fetch_model by its params and code, the flow additionally by the source's content.
        data_inputs = {Path(p) for k, p in {**call.inputs, **call.watch}.items() if p is not None and k != "source_dir"}
        dep_paths = {(REPO / d.fs_path).resolve() for d in stage.deps}
        for path in ((REPO / p).resolve() for p in data_inputs):
            # A file input is covered by a dep on it or on a folder holding it.
            assert path in dep_paths or dep_paths & set(path.parents), f"{name}: {path} is not a DVC dep"


def test_params_section_per_stage(dvc_stages, flow_calls):
    for name, call in flow_calls.items():
        declared = {key for p in dvc_stages[name].deps if hasattr(p, "params") for key in p.params}
        if call.stage == "report":  # params.yaml probes sensitivity: which instances exist is the report's input
            assert declared == {"models", "seq_lens", "targets", "compile.jobs", "report", "family",
                                "sensitivity.models", "sensitivity.variants"}
        elif call.stage == "sensitivity":  # its own settings, not the lists of what else is probed
            own = {f"sensitivity.{k}" for k in ("seq_len", "axes", "probes", "items", "seed", "calibration_rows",
                                                "rank_by", "threads")}
            assert declared == {*own, "seq_lens", f"quantize.variants.{call.args['variant']}",
                                "quantize.calibration_chunk", "evaluation", "family"}
        elif call.stage == "compile":
            common = {"compile.verify_inputs", "compile.verify_count", "compile.verify_min_cosine", "compile.threads"}
            assert declared == {f"compile.{call.args['device']}", *common, "family"}
        elif call.stage == "calibration_data":
            assert declared == {"calibration_data", "seq_lens", "family", "evaluation"}  # no pool row is evaluated
        elif call.stage == "latency_curve":
            assert declared == {"latency_curve", "export_onnx", "graph_surgery", "calibration_data",
                                "quantize", "benchmark", "targets", "family"}
        elif call.stage == "prune":
            # A search scores its levels on every evaluation set, at every length, against the budget.
            assert declared == {f"prune.models.{call.args['model']}", "family", "evaluation",
                                "report.accuracy_budget", "seq_lens"}
        elif call.stage == "quantize":
            assert declared == {f"quantize.variants.{call.args['variant']}", "quantize.calibration_chunk", "family"}
        elif call.stage == "bundle":  # its buckets are lengths of seq_lens; it times the report's text sample
            assert declared == {"bundle", "seq_lens", "report.seq_len_choice.text", "benchmark.threads",
                                "benchmark.warmup_runs", "benchmark.worker_timeout_s", "evaluation", "family"}
        elif call.stage == "race":  # the bundle stage's sample of the report's text, the benchmark's timing
            assert declared == {"race", "bundle.mix_samples", "bundle.seed", "report.seq_len_choice.text",
                                "benchmark.threads", "benchmark.warmup_runs", "benchmark.worker_timeout_s", "family"}
        elif call.stage in ("benchmark", "reference"):
            assert declared == {call.stage, "evaluation", "family"}
        else:
            assert declared == {call.stage, "family"}, name


def test_a_stale_dvc_yaml_is_refused(tmp_path, cfg):
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text().replace("tasks/core/feeds.py\n", "", 1))
    with pytest.raises(Exception, match="out of date with params.yaml or the code's imports; run `edgeopt dvc-yaml`"):
        dvc_yaml.check(cfg, tmp_path)


def test_the_committed_params_set_every_key_dvc_yaml_reads(cfg):
    """A settings field added without its params.yaml line passes validation (pydantic fills the default) and
    fails `edgeopt run`'s DVC check (sensitivity.rank_by did, in the slow pipeline test)."""
    dvc_yaml.check(cfg, REPO)


def test_a_stage_whose_code_was_edited_during_the_run_is_refused_before_it_runs(flow_calls, monkeypatch):
    """A run hashes the project's source when it starts; a stage whose code differs by the time its key is taken
    (edited mid-run: this process still runs what it loaded) stops in one line instead of being recorded with code it
    did not run. Outside a run nothing is checked."""
    call = next(c for c in flow_calls.values() if c.stage == "bundle")
    edited = call.code[0]
    with stages.one_closure_per_stage():
        sha = fingerprint.file_sha256(Path(edited))
        assert stages._run_code.get()[edited][1] == sha
        stages.check_code_unchanged(call.code)  # unchanged: nothing to say
        monkeypatch.setitem(stages._run_code.get(), edited, ((0, 0), sha))  # touched, same content: still the code
        stages.check_code_unchanged(call.code)
        monkeypatch.setitem(stages._run_code.get(), edited, ((0, 0), "0" * 64))  # as if edited after the start
        fresh = dataclasses.replace(call)
        with pytest.raises(StageError, match=f"^{edited} changed while this run was going"):
            fresh.key  # noqa: B018 (the property is the check)
    stages.check_code_unchanged(call.code)
