"""Running edgeopt as a service: real Prefect and MLflow servers and a process worker on 127.0.0.1
(`edgeopt services`), the scheduled deployment from prefect.yaml (`edgeopt deploy`), a run executed
by the worker on the tiny BERT, its runs and registered model read back through MLflow's REST API,
and `edgeopt services stop` leaving no process behind. Plus prefect.yaml's deployments checked against
params.yaml, and the registry path for OpenVINO IR."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from flows import services
from flows.deploy import read_deployments, validate
from tasks.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    # The project's own PREFECT_API_URL (e.g. the test harness's) must not leak in: the command
    # finds the server from `edgeopt services`, as a user's shell would.
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**base, "COLUMNS": "200", **(env or {})})


def flow_run_state(api: str, run_id: str) -> dict:
    return requests.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]


def mlflow_runs(mlflow: str, experiment_id: str, filter_string: str) -> list[dict]:
    reply = requests.post(f"{mlflow}/api/2.0/mlflow/runs/search",
                          json={"experiment_ids": [experiment_id], "filter": filter_string}, timeout=10)
    reply.raise_for_status()
    return reply.json().get("runs", [])


def as_dict(entries: list[dict]) -> dict:
    return {e["key"]: e["value"] for e in entries}


@pytest.mark.slow  # a minute or more: the tiny DAG several times, or servers
def test_scheduled_deployment_runs_on_worker_and_logs_to_mlflow_server(workspace, stack):
    shutil.copy2(REPO / "prefect.yaml", workspace / "prefect.yaml")
    api = f"http://127.0.0.1:{stack.prefect_port}/api"
    mlflow = f"http://127.0.0.1:{stack.mlflow_port}"
    edgeopt = [sys.executable, "-m", "flows.cli"]

    deployed = cli(*edgeopt, "deploy", "nightly", cwd=workspace)
    assert deployed.returncode == 0, deployed.stderr
    assert f"nightly: cron 0 2 * * * on work pool edgeopt ({api})" in deployed.stdout
    [deployment] = requests.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["nightly"]}}},
                                 timeout=10).json()
    [schedule] = deployment["schedules"]
    assert schedule["active"] and schedule["schedule"] == {"cron": "0 2 * * *", "timezone": "UTC", "day_or": True}
    assert deployment["work_pool_name"] == "edgeopt"
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(workspace.resolve())}}]

    # A run now, with a per-run override merged into params.yaml (one length, fewer timed runs).
    overrides = {"seq_lens": [16], "benchmark": {"timed_runs": 60}}
    triggered = cli(sys.executable, "-m", "prefect", "deployment", "run", "edgeopt-pipeline/nightly",
                    "--params", json.dumps({"overrides": overrides}), cwd=workspace, env={"PREFECT_API_URL": api})
    assert triggered.returncode == 0, triggered.stderr
    run = {"id": re.search(r"UUID: ([0-9a-f-]{36})", triggered.stdout)[1]}
    deadline = time.time() + RUN_TIMEOUT_S
    while (state := flow_run_state(api, run["id"]))["type"] not in TERMINAL and time.time() < deadline:
        time.sleep(1)
    worker_log = services.log_file(workspace, "prefect-worker").read_text()[-3000:]
    assert state["type"] == "COMPLETED", f"{state}\n{worker_log}"
    # The scheduler has queued the next nightly runs at 02:00 UTC.
    scheduled = requests.post(f"{api}/flow_runs/filter", json={
        "deployments": {"id": {"any_": [deployment["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
    }, timeout=10).json()
    assert scheduled and all(r["next_scheduled_start_time"].endswith("T02:00:00Z") for r in scheduled)

    # MLflow, through its REST API: the parent run names this Prefect run, its children the rows.
    experiment = requests.get(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": "edgeopt"}, timeout=10).json()["experiment"]
    [parent] = mlflow_runs(mlflow, experiment["experiment_id"], f"tags.`prefect.flow_run_id` = '{run['id']}'")
    parent_tags = as_dict(parent["data"]["tags"])
    assert parent_tags["prefect.deployment"] == "nightly"
    assert as_dict(parent["data"]["params"])["seq_lens"] == "[16]"
    children = mlflow_runs(mlflow, experiment["experiment_id"],
                           f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'")
    rows = {r["info"]["run_name"]: as_dict(r["data"]["params"]) for r in children}
    bench = "dense/fp32/ort_cpu/16"
    assert set(rows) == {bench, "compile dense/ort_qdq_a16w8/qnn_htp@snapdragon_8_gen_3/16"}
    # 60 timed runs in each of the 2 repeats.
    assert (rows[bench]["timed_runs_per_repeat"], rows[bench]["timed_runs_total"]) == ("60", "120")
    bench_run = next(r for r in children if r["info"]["run_name"] == bench)
    assert 0 < as_dict(bench_run["data"]["metrics"])["latency_p50_ms"] < 1000

    # The device's best artifact is a model version linked to its benchmark run, stored via the server.
    [version] = requests.get(f"{mlflow}/api/2.0/mlflow/registered-models/get",
                             params={"name": "edgeopt-ort_cpu-seq16"}, timeout=10).json()["registered_model"][
                                 "latest_versions"]
    assert version["run_id"] == bench_run["info"]["run_id"]
    assert parent_tags["registered.ort_cpu/16"] == f"edgeopt-ort_cpu-seq16/{version['version']}"
    files = requests.get(f"{mlflow}/api/2.0/mlflow/artifacts/list",
                         params={"run_id": version["run_id"], "path": "model"}, timeout=10).json()["files"]
    assert {"model/MLmodel", "model/model.onnx"} <= {f["path"] for f in files}
    assert list((workspace / ".edgeopt" / "services" / "mlflow" / "artifacts").rglob("model.onnx"))

    # Stop: every service and everything they started (uvicorn, the flow run) is gone.
    started = services.service_processes(workspace)
    assert len(started) >= 3
    stopped = cli(*edgeopt, "services", "stop", cwd=workspace)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == "stopped: prefect-worker, prefect-server, mlflow"
    assert not [p.pid for p in started if p.is_running() and p.status() != "zombie"]
    assert services.service_processes(workspace) == []
    assert not list((workspace / ".edgeopt" / "services").glob("*.pid"))


def test_prefect_yaml_deployments_validate_against_params_yaml():
    deployments = read_deployments(REPO / "prefect.yaml")
    assert {d["name"] for d in deployments} == {"nightly", "cpu-quick"}
    for deployment in deployments:
        validate(REPO, deployment, REPO / "prefect.yaml")
        assert deployment["schedules"][0]["cron"]
        assert deployment["work_pool"]["name"] == services.ServicesParams().work_pool


def test_bad_override_in_prefect_yaml_names_the_deployment_and_field(tmp_path):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    spec["deployments"][1]["parameters"]["overrides"]["targets"] = [{"variant": "fp32", "device": "tpu"}]
    bad = tmp_path / "prefect.yaml"
    bad.write_text(yaml.safe_dump(spec))
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    [deployment] = read_deployments(bad, ["cpu-quick"])
    with pytest.raises(ConfigError, match=r"^.*prefect.yaml: deployment cpu-quick: .*params.yaml: targets: "
                                          r"unknown device\(s\) \['tpu'\]"):
        validate(tmp_path, deployment, bad)
    with pytest.raises(ConfigError, match=r"no deployment named \['weekly'\]; known: \['nightly', 'cpu-quick'\]"):
        read_deployments(bad, ["weekly"])


def test_best_openvino_ir_is_registered_as_files_once(tiny_onnx, tmp_path):
    """MLflow has no OpenVINO flavor: the IR's files are the model version; a rerun with the same
    artifact adds no version."""
    import openvino as ov
    from mlflow.tracking import MlflowClient

    from flows.tracking import register_best
    from tasks.config import load_config

    ir = tmp_path / "artifacts" / "quantize" / "dense" / "ov_nncf_int8-16" / "model.xml"
    ov.save_model(ov.convert_model(str(tiny_onnx)), str(ir))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("edgeopt", artifact_location=(tmp_path / "mlartifacts").as_uri())
    row = {"model": "dense", "variant": "ov_nncf_int8", "device": "openvino_cpu", "target": "host", "seq_len": 16,
           "artifact": str(ir.relative_to(tmp_path)), "artifact_sha256": "ab12", "latency_p50_ms": 1.5,
           "metric_name": "spearman", "metric_value": 80.0, "metric_drop": 0.1, "dvc_stage": "benchmark@dense-target4-16"}
    best = {"openvino_cpu/16": {"model": "dense", "variant": "ov_nncf_int8", "target": "host", "artifact": row["artifact"]}}
    registered = []
    for _ in range(2):
        run_id = client.create_run(experiment).info.run_id
        registered.append(register_best(client, load_config(REPO / "params.yaml"), tmp_path, best, [row],
                                        {("dense", "ov_nncf_int8", "openvino_cpu", "host", 16): run_id}))
    assert registered == [{"openvino_cpu/16": "edgeopt-openvino_cpu-seq16/1"}] * 2
    version = client.get_model_version("edgeopt-openvino_cpu-seq16", "1")
    assert version.tags["format"] == "openvino_ir" and version.tags["artifact_sha256"] == "ab12"
    files = {Path(f.path).name for f in client.list_artifacts(version.run_id, "model")}
    assert files == {"model.xml", "model.bin"}


def test_credentials_in_uris_never_reach_mlflow_params():
    from flows.tracking import flat_config, redact
    from tasks.config import load_config

    cfg = load_config(REPO / "params.yaml", {"tracking": {"tracking_uri": "https://bob:s3cret@mlflow.example:8443/"}})
    flat = flat_config(cfg)
    assert flat["tracking.tracking_uri"] == "https://bob:***@mlflow.example:8443/"
    assert not [k for k, v in flat.items() if "s3cret" in v]
    assert redact("MLflow server http://127.0.0.1:5001 unreachable") == "MLflow server http://127.0.0.1:5001 unreachable"
