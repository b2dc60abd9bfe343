"""edgeopt stages: plain typed functions, files and params in, files out.

Each module is one stage (`fetch_model`, `export_onnx`, `benchmark`, `report`). A stage's `run`
never reads `params.yaml`, never logs to MLflow and never knows which orchestrator called it;
`flows/` does that wiring for Prefect and for `dvc repro` alike.
"""
