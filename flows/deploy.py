"""`edgeopt deploy`: create the deployments of `prefect.yaml` on a running Prefect server.

`prefect.yaml` stays the one definition (Prefect's own `prefect deploy` reads it and creates the
deployments); this adds what Prefect cannot know: each deployment's `overrides` are merged into its
params file and validated first, so a typo fails here with the field named rather than at 02:00 in
a worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests
import yaml

from flows.services import HEALTH_REQUEST_TIMEOUT_S, ServiceError
from tasks.config import load_config
from tasks.core.errors import ConfigError

ENTRYPOINT = "flows/pipeline.py:pipeline"
DEPLOY_TIMEOUT_S = 300


def read_deployments(prefect_file: Path, names: list[str] | None = None) -> list[dict]:
    """The deployments in `prefect_file` (all, or those named)."""
    if not prefect_file.is_file():
        raise ConfigError(f"{prefect_file}: not found; run from the project root or pass --prefect-file")
    try:
        spec = yaml.safe_load(prefect_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{prefect_file}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from exc
    deployments = spec.get("deployments") or []
    if not deployments:
        raise ConfigError(f"{prefect_file}: no deployments; add one under `deployments:`")
    known = [d.get("name") for d in deployments]
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise ConfigError(f"{prefect_file}: no deployment named {unknown}; known: {known}")
    return [d for d in deployments if not names or d.get("name") in names]


def validate(root: Path, deployment: dict, prefect_file: Path) -> None:
    """The flow's config for this deployment must load: params file + overrides, all fields valid."""
    name = deployment.get("name")
    if deployment.get("entrypoint") != ENTRYPOINT:
        raise ConfigError(f"{prefect_file}: deployment {name}: entrypoint must be {ENTRYPOINT}")
    params = deployment.get("parameters") or {}
    params_file = root / params.get("project_dir", ".") / params.get("params_file", "params.yaml")
    try:
        load_config(params_file, params.get("overrides"))
    except ConfigError as exc:
        raise ConfigError(f"{prefect_file}: deployment {name}: {exc}") from None


def deploy(root: Path, api_url: str, prefect_file: Path, names: list[str] | None = None) -> list[dict]:
    """Validate, then `prefect deploy` the deployments (all, or those named) from `root`, which
    becomes their flow runs' working directory. Returns what the server now holds for each."""
    deployments = read_deployments(prefect_file, names)
    for deployment in deployments:
        validate(root, deployment, prefect_file)
    selected = [arg for d in deployments for arg in ("--name", d["name"])]
    cmd = [sys.executable, "-m", "prefect", "deploy", "--no-prompt", "--prefect-file", str(prefect_file.resolve()),
           *selected]
    env = {**os.environ, "PREFECT_API_URL": api_url}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=DEPLOY_TIMEOUT_S)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise ServiceError(f"prefect deploy failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
    return server_deployments(api_url, [d["name"] for d in deployments])


def server_deployments(api_url: str, names: list[str]) -> list[dict]:
    """name, cron schedules, work pool and parameters of the named deployments on the server."""
    reply = requests.post(
        f"{api_url}/deployments/filter",
        json={"deployments": {"name": {"any_": names}}},
        timeout=HEALTH_REQUEST_TIMEOUT_S,
    )
    reply.raise_for_status()
    return [
        {
            "id": d["id"],
            "name": d["name"],
            "crons": [s["schedule"].get("cron") for s in d.get("schedules", []) if s.get("active")],
            "work_pool": d.get("work_pool_name"),
            "parameters": d.get("parameters", {}),
        }
        for d in reply.json()
    ]
