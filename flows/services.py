"""Local services for running edgeopt as a service: an MLflow tracking server, a Prefect server and a
Prefect process worker, bound to 127.0.0.1 by default (`edgeopt services start|stop|status|env`).

Everything lives under `.edgeopt/services/` in the project: `<name>.pid`, `<name>.log`, the servers'
state (Prefect's home and sqlite database, MLflow's sqlite store and artifact root), `services.json`
(the settings they were started with, so `stop`/`status` need no flags) and `env.sh` (the client
variables to source). Each service runs detached in its own process group; `stop` ends the group and
any descendant that left it, so no MLflow or Prefect child process is left behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import requests
from pydantic import BaseModel, ConfigDict, Field

from tasks.core.errors import ServiceError

STATE_DIR = Path(".edgeopt") / "services"
# Start order: the worker needs the Prefect server, and hands the MLflow URL to the flow runs it starts.
SERVICES = ("mlflow", "prefect-server", "prefect-worker")
# Set in each service's environment (inherited by everything it starts): `<state dir>/<service>`.
MARKER_ENV = "EDGEOPT_SERVICE"
HEALTH_POLL_S = 0.25
HEALTH_REQUEST_TIMEOUT_S = 2.0
KILL_WAIT_S = 5.0


class ServicesParams(BaseModel):
    """How the local services run; `edgeopt services start` options override these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="interface every server binds to; loopback keeps them private")
    prefect_port: int = Field(4200, ge=1, le=65535)
    mlflow_port: int = Field(5001, ge=1, le=65535, description="5000 is left to `edgeopt ui`")
    work_pool: str = Field("edgeopt", min_length=1, description="process work pool the worker serves")
    worker_limit: int = Field(1, ge=1, description="flow runs at once: benchmarks need the whole machine")
    worker_poll_s: float = Field(10, gt=0, description="how often the worker asks for due runs (Prefect's default)")
    # `prefect server start` takes 5-15 s here, longer on its first start (database migrations).
    start_timeout_s: float = Field(90, gt=0)
    # A worker's graceful shutdown waits for the server to acknowledge; then the group is killed.
    stop_timeout_s: float = Field(20, gt=0)


@dataclass(frozen=True)
class Service:
    name: str
    cmd: list[str]
    env: dict[str, str]
    url: str  # what clients use
    port: int | None  # the port it binds; the worker binds none
    healthy: Callable[[float], bool]  # given the launch time, is it up and serving?


def state_dir(root: Path) -> Path:
    return (root / STATE_DIR).resolve()


def pid_file(root: Path, name: str) -> Path:
    return state_dir(root) / f"{name}.pid"


def log_file(root: Path, name: str) -> Path:
    return state_dir(root) / f"{name}.log"


def _url_host(host: str) -> str:
    """The address clients dial: a server bound to all interfaces is still reached on loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _get_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=HEALTH_REQUEST_TIMEOUT_S).ok
    except requests.RequestException:
        return False


def _worker_online(api_url: str, pool: str, worker: str) -> Callable[[float], bool]:
    """The worker counts as up once the server has a heartbeat from it newer than its launch."""

    def check(launched: float) -> bool:
        try:
            reply = requests.post(f"{api_url}/work_pools/{pool}/workers/filter", json={},
                                  timeout=HEALTH_REQUEST_TIMEOUT_S)
        except requests.RequestException:
            return False
        if not reply.ok:
            return False
        for record in reply.json():
            beat = record.get("last_heartbeat_time")
            if (record["name"] == worker and record["status"] == "ONLINE" and beat
                    and datetime.fromisoformat(beat).timestamp() >= launched - 1):
                return True
        return False

    return check


def plan(root: Path, params: ServicesParams) -> dict[str, Service]:
    """The command, environment, URL and health check of each service."""
    state = state_dir(root)
    host = _url_host(params.host)
    mlflow_url = f"http://{host}:{params.mlflow_port}"
    prefect_url = f"http://{host}:{params.prefect_port}"
    api_url = f"{prefect_url}/api"
    prefect_env = {"PREFECT_HOME": str(state / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    worker_name = f"edgeopt-{socket.gethostname()}-{params.prefect_port}"
    return {
        "mlflow": Service(
            name="mlflow",
            cmd=[sys.executable, "-m", "mlflow", "server",
                 "--backend-store-uri", f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
                 # Artifacts are proxied by the server (mlflow-artifacts:/), so clients need no file access.
                 "--artifacts-destination", str(state / "mlflow" / "artifacts"),
                 "--host", params.host, "--port", str(params.mlflow_port),
                 # One worker starts in seconds; MLflow's job runner (huey) is not used by edgeopt.
                 "--workers", "1"],
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            url=mlflow_url,
            port=params.mlflow_port,
            healthy=lambda _: _get_ok(f"{mlflow_url}/health"),
        ),
        "prefect-server": Service(
            name="prefect-server",
            cmd=[sys.executable, "-m", "prefect", "server", "start",
                 "--host", params.host, "--port", str(params.prefect_port)],
            env=prefect_env,
            url=api_url,
            port=params.prefect_port,
            healthy=lambda _: _get_ok(f"{api_url}/health"),
        ),
        "prefect-worker": Service(
            name="prefect-worker",
            cmd=[sys.executable, "-m", "prefect", "worker", "start", "--pool", params.work_pool,
                 "--type", "process", "--name", worker_name, "--limit", str(params.worker_limit)],
            env={
                **prefect_env,
                "PREFECT_API_URL": api_url,
                "PREFECT_WORKER_QUERY_SECONDS": str(params.worker_poll_s),
                # The flow runs it starts log to this project's MLflow server.
                "MLFLOW_TRACKING_URI": mlflow_url,
            },
            url=f"{api_url} (work pool {params.work_pool})",
            port=None,
            healthy=_worker_online(api_url, params.work_pool, worker_name),
        ),
    }


def _saved_params(root: Path) -> ServicesParams:
    path = state_dir(root) / "services.json"
    if not path.is_file():
        return ServicesParams()
    return ServicesParams.model_validate_json(path.read_text(encoding="utf-8"))


def running_pid(root: Path, service: Service) -> int | None:
    """The pid in the service's pid file if that process is alive and is this service (not a reused
    pid); a stale pid file is removed."""
    path = pid_file(root, service.name)
    if not path.is_file():
        return None
    pid = int(path.read_text().strip())
    try:
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and proc.cmdline() == service.cmd:
            return pid
    except psutil.Error:
        pass
    path.unlink()
    return None


def _port_taken(host: str, port: int) -> bool:
    """True if something listens on (host, port). SO_REUSEADDR, as the servers set it, so a port
    in TIME_WAIT after a recent stop does not count as taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(empty log)"


def _launch(root: Path, service: Service) -> tuple[psutil.Process, float]:
    log = log_file(root, service.name)
    with log.open("a", encoding="utf-8") as out:
        out.write(f"--- {datetime.now(UTC).isoformat(timespec='seconds')} start: {' '.join(service.cmd)}\n")
        out.flush()
        launched = time.time()
        # Own session and process group: the service outlives this command, and `stop` can end
        # the whole group (servers spawn uvicorn workers, the worker spawns flow runs).
        proc = subprocess.Popen(
            service.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=root,
            env={**os.environ, **service.env, MARKER_ENV: str(state_dir(root) / service.name)},
            start_new_session=True,
        )
    pid_file(root, service.name).write_text(f"{proc.pid}\n")
    return psutil.Process(proc.pid), launched


def _wait_healthy(root: Path, service: Service, proc: psutil.Process, launched: float, timeout_s: float) -> None:
    log = log_file(root, service.name)
    while True:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            code = proc.wait(timeout=KILL_WAIT_S)
            pid_file(root, service.name).unlink(missing_ok=True)
            raise ServiceError(f"{service.name} exited during start-up (code {code}): {_last_line(log)}; see {log}")
        if service.healthy(launched):
            return
        if time.time() - launched > timeout_s:
            raise ServiceError(
                f"{service.name} did not come up on {service.url} within {timeout_s:g} s; see {log}"
            )
        time.sleep(HEALTH_POLL_S)


def service_processes(root: Path, name: str | None = None) -> list[psutil.Process]:
    """Live processes started for this project's services (one, or all): found by the marker
    variable every service and everything it spawns inherits, so descendants that left the process
    group or lost their parent are found too."""
    wanted = {str(state_dir(root) / n) for n in ([name] if name else SERVICES)}
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER_ENV) in wanted and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _group_and_descendants(pid: int) -> list[psutil.Process]:
    procs: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pid:
                procs[proc.pid] = proc
        except (ProcessLookupError, psutil.Error):
            continue
    with contextlib.suppress(psutil.NoSuchProcess):
        procs.update({child.pid: child for child in psutil.Process(pid).children(recursive=True)})
    return list(procs.values())


def _gone(proc: psutil.Process) -> bool:
    """Exited: no such process, or a zombie (reaped here when it is our child, e.g. in tests; a
    zombie whose parent is another process stays in the table until that parent reaps it)."""
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    with contextlib.suppress(psutil.Error, ChildProcessError):
        proc.wait(0)
    return True


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.time() + timeout_s
    while (alive := [p for p in procs if not _gone(p)]) and time.time() < deadline:
        time.sleep(HEALTH_POLL_S)
    return alive


def _terminate(procs: list[psutil.Process], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL what is still there after `timeout_s`."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    alive = _wait_gone(procs, timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    alive = _wait_gone(alive, KILL_WAIT_S)
    if alive:
        raise ServiceError(f"processes {[p.pid for p in alive]} survived SIGKILL; check them with `ps`")


def _stop_one(root: Path, service: Service, timeout_s: float) -> bool:
    pid = running_pid(root, service)
    procs = {p.pid: p for p in service_processes(root, service.name)}
    if pid is not None:
        procs.update({p.pid: p for p in _group_and_descendants(pid)})
    pid_file(root, service.name).unlink(missing_ok=True)
    _terminate(list(procs.values()), timeout_s)
    return pid is not None


def _check_names(names: Iterable[str]) -> list[str]:
    names = list(names) or list(SERVICES)
    unknown = sorted(set(names) - set(SERVICES))
    if unknown:
        raise ServiceError(f"unknown service(s) {unknown}; known: {list(SERVICES)}")
    return [name for name in SERVICES if name in names]  # start order


def start(root: Path, params: ServicesParams, names: Iterable[str] = ()) -> dict[str, str]:
    """Start the named services (default: all) unless already running; return name -> URL.
    All or nothing: if one fails to come up, the ones this call started are stopped again."""
    names = _check_names(names)
    state_dir(root).mkdir(parents=True, exist_ok=True)
    running = {name for name in SERVICES if running_pid(root, plan(root, _saved_params(root))[name])}
    if running and _saved_params(root) != params:
        raise ServiceError(
            f"{sorted(running)} already running with other settings ({state_dir(root) / 'services.json'}); "
            "`edgeopt services stop` first"
        )
    services = plan(root, params)
    if "prefect-worker" in names and "prefect-server" not in names and "prefect-server" not in running:
        raise ServiceError(f"prefect-worker needs the Prefect server at {services['prefect-server'].url}; "
                           "start prefect-server too")
    (state_dir(root) / "services.json").write_text(params.model_dump_json(indent=2) + "\n", encoding="utf-8")
    todo = [services[name] for name in names if name not in running]
    for service in todo:
        if service.port is not None and _port_taken(params.host, service.port):
            raise ServiceError(
                f"{service.name}: port {service.port} on {params.host} is taken by another process; "
                f"stop it or pick another port (--{service.name.split('-')[0]}-port)"
            )
    started: list[Service] = []
    try:
        # Servers start side by side (Prefect's is the slow one); the worker needs the Prefect server up.
        servers = [s for s in todo if s.port is not None]
        launched = [(s, *_launch(root, s)) for s in servers]
        started += servers
        for service, proc, at in launched:
            _wait_healthy(root, service, proc, at, params.start_timeout_s)
        for service in (s for s in todo if s.port is None):
            started.append(service)
            _wait_healthy(root, service, *_launch(root, service), params.start_timeout_s)
    except BaseException:
        for service in reversed(started):
            _stop_one(root, service, params.stop_timeout_s)
        raise
    _write_env(root)
    return {name: services[name].url for name in names}


def stop(root: Path, names: Iterable[str] = ()) -> list[str]:
    """Stop the named services (default: all), worker first; return the ones that were running."""
    params = _saved_params(root)
    services = plan(root, params)
    return [name for name in reversed(_check_names(names)) if _stop_one(root, services[name], params.stop_timeout_s)]


@dataclass(frozen=True)
class Status:
    name: str
    pid: int | None
    healthy: bool
    url: str
    log: Path


def status(root: Path) -> list[Status]:
    services = plan(root, _saved_params(root))
    result = []
    for name in SERVICES:
        pid = running_pid(root, services[name])
        # A worker's heartbeat may be up to its interval old: any heartbeat since boot will do here.
        healthy = pid is not None and services[name].healthy(psutil.Process(pid).create_time() - 1)
        result.append(Status(name, pid, healthy, services[name].url, log_file(root, name)))
    return result


def client_env(root: Path) -> dict[str, str]:
    """What a client (the Prefect CLI, `edgeopt run`) needs to use the running services."""
    services = plan(root, _saved_params(root))
    env = {}
    if running_pid(root, services["prefect-server"]):
        env["PREFECT_API_URL"] = services["prefect-server"].url
    if running_pid(root, services["mlflow"]):
        env["MLFLOW_TRACKING_URI"] = services["mlflow"].url
    return env


def _write_env(root: Path) -> None:
    lines = [f"export {k}={v}" for k, v in client_env(root).items()]
    (state_dir(root) / "env.sh").write_text("\n".join(lines) + "\n", encoding="utf-8")


def prefect_api_url(root: Path) -> str:
    """The Prefect API to use: $PREFECT_API_URL, else this project's running server."""
    url = os.environ.get("PREFECT_API_URL") or client_env(root).get("PREFECT_API_URL")
    if not url:
        raise ServiceError("no Prefect server: set PREFECT_API_URL or run `edgeopt services start`")
    if not _get_ok(f"{url.rstrip('/')}/health"):
        raise ServiceError(f"Prefect server {url} is not answering; start it with `edgeopt services start`")
    return url.rstrip("/")


RUN_SERVER = "run-server"
RUN_SERVER_STOP_S = 3.0
API_CHECK_TIMEOUT_S = 8.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nobody listens on."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_server_processes(root: Path, orphaned_only: bool = False) -> list[psutil.Process]:
    """Live Prefect servers that runs of this project started, each marked with its run's pid
    (`<state>/run-server-<pid>`, inherited by whatever it spawns); with `orphaned_only`, those whose run is gone."""
    prefix = str(state_dir(root) / RUN_SERVER) + "-"
    found = []
    for proc in psutil.process_iter():
        try:
            marker = proc.environ().get(MARKER_ENV, "")
            if not marker.startswith(prefix) or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if not orphaned_only or not psutil.pid_exists(int(marker[len(prefix):])):
                found.append(proc)
        except (psutil.Error, ValueError):
            continue
    return found


def reap_run_server(root: Path) -> list[int]:
    """Stop the Prefect servers of runs killed before they could stop them. A server whose run is alive (another
    run, e.g. one this run will wait for at the workspace lock) is left alone: it is that run's."""
    left = run_server_processes(root, orphaned_only=True)
    _terminate(left, RUN_SERVER_STOP_S)
    for stale in [*state_dir(root).glob(f"{RUN_SERVER}-*.pid"), *state_dir(root).glob(f"{RUN_SERVER}-*.log")]:
        owner = stale.stem.removeprefix(f"{RUN_SERVER}-")
        if owner.isdigit() and not psutil.pid_exists(int(owner)):  # the pid and log files of runs that are gone
            stale.unlink(missing_ok=True)
    return [p.pid for p in left]


@contextlib.contextmanager
def run_api(root: Path, timeout_s: float = 90) -> Iterator[Callable[[], str]]:
    """The Prefect API one `edgeopt run` talks to, as `ready()`: it returns the API URL once the API answers,
    so the caller loads its own modules while a server starts. $PREFECT_API_URL when set (a server that does
    not answer is one line within seconds); else a Prefect server of the run's own, in its own session, so a
    Ctrl-C reaches the run and not the server it must report to, stopped when the run ends. A server a
    killed run left behind is stopped first."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        try:
            ok = requests.get(f"{url.rstrip('/')}/health", timeout=(3, API_CHECK_TIMEOUT_S - 3)).ok
        except requests.RequestException:
            ok = False
        if not ok:
            raise ServiceError(f"PREFECT_API_URL {url} is not answering; start it (`edgeopt services start "
                               "prefect-server`) or unset PREFECT_API_URL for a server of the run's own")
        yield lambda: url.rstrip("/")
        return
    state_dir(root).mkdir(parents=True, exist_ok=True)
    reap_run_server(root)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    service = Service(
        name=f"{RUN_SERVER}-{os.getpid()}",  # one per run: two runs of a project never share (or reap) a server
        cmd=[sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={"PREFECT_HOME": str(state_dir(root) / "run-server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        url=api,
        port=port,
        healthy=lambda _: _get_ok(f"{api}/health"),
    )
    proc, launched = _launch(root, service)

    def ready() -> str:
        _wait_healthy(root, service, proc, launched, timeout_s)
        return api

    try:
        yield ready
    finally:
        _terminate([proc, *_group_and_descendants(proc.pid)], RUN_SERVER_STOP_S)
        pid_file(root, service.name).unlink(missing_ok=True)
