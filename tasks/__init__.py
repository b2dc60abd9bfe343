"""edgeopt's pipeline code, in one-way layers (checked by import-linter, see pyproject.toml):

core ← data, transforms ← families, recipes, backends ← builders ← stages ← config; `flows/` sits on top.
A stage's `run` never reads `params.yaml`, never logs to MLflow and never knows which orchestrator called
it; `flows/` does that wiring for Prefect and for `dvc repro` alike.
"""
