"""The package's dependency rules, checked by import-linter's contracts in pyproject.toml: layers point
one way (core <- data/transforms <- families/recipes/backends <- builders <- stages <- config <- flows)
and no stage imports another. A stage module missing from the independence contract would escape it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_every_stage_module_is_in_the_independence_contract():
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [independence] = [c for c in contracts if c["type"] == "independence"]
    stages = {f"tasks.stages.{p.stem}" for p in (REPO / "tasks" / "stages").glob("*.py") if p.stem != "__init__"}
    assert set(independence["modules"]) == stages
