"""dvc.yaml and the flow must describe the same stages, code deps, params and output paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from dvc.repo import Repo

from flows import stages
from tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dvc_stages():
    with Repo(str(REPO)) as repo:
        return {s.addressing: s for s in repo.index.stages}


@pytest.fixture(scope="module")
def flow_calls():
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        cfg = load_config(REPO / "params.yaml")
        return cfg, {c.name: c for c in stages.all_calls(cfg)}
    finally:
        os.chdir(cwd)


def test_same_stage_instances(dvc_stages, flow_calls):
    _, calls = flow_calls
    assert set(dvc_stages) == set(calls)


def test_same_outputs_and_code_deps(dvc_stages, flow_calls):
    _, calls = flow_calls
    for name, call in calls.items():
        stage = dvc_stages[name]
        outs = {Path(o.def_path) for o in stage.outs}
        assert outs == {call.out_dir}, name
        deps = {Path(d.def_path) for d in stage.deps}
        assert {Path(f) for f in call.code} <= deps, f"{name}: dvc.yaml misses code deps"
        # DVC cannot choose deps per device, so it may list other devices' shared backend code.
        shared = {Path(f) for files in stages.BACKEND_SHARED_CODE.values() for f in files}
        code_deps = {d for d in deps if d.parts[0] == "tasks"}
        extra = code_deps - {Path(f) for f in call.code}
        assert extra <= shared, f"{name}: dvc.yaml lists code the flow does not hash: {extra}"
        # fetch_model's source lives outside the project (site-packages, a hub cache): DVC tracks
        # fetch_model by its params and code, the flow additionally by the source's content.
        data_inputs = {Path(p) for k, p in call.inputs.items() if p is not None and k != "source_dir"}
        dep_paths = {(REPO / d.fs_path).resolve() for d in stage.deps}
        for path in (p.resolve() for p in data_inputs):
            # A file input is covered by a dep on it or on a folder holding it.
            assert path in dep_paths or dep_paths & set(path.parents), f"{name}: {path} is not a DVC dep"


def test_params_section_per_stage(dvc_stages, flow_calls):
    _, calls = flow_calls
    for name, call in calls.items():
        declared = {key for p in dvc_stages[name].deps if hasattr(p, "params") for key in p.params}
        if call.stage == "report":
            assert declared == {"models", "seq_lens", "targets", "compile.jobs", "report"}
        elif call.stage == "compile":
            common = {"compile.verify_inputs", "compile.verify_count", "compile.verify_min_cosine", "compile.threads"}
            assert declared == {f"compile.{call.args['device']}", *common}
        elif call.stage == "calibration_data":
            assert declared == {"calibration_data", "seq_lens"}
        elif call.stage == "latency_curve":
            assert declared == {"report.latency_curve", "export_onnx", "graph_surgery", "calibration_data",
                                "quantize", "benchmark", "targets"}
        elif call.stage == "prune":
            assert declared == {f"prune.models.{call.args['model']}"}
        elif call.stage == "quantize":
            assert declared == {f"quantize.variants.{call.args['variant']}", "quantize.calibration_chunk"}
        else:
            assert declared == {call.stage}, name
