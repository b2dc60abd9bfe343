#!/usr/bin/env bash
# Create .venv and install edgeopt with everything it runs and tests with. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,aimet]"
# AIMET (recipe aimet_qnn) without onnx2torch, see pyproject.toml's `aimet` extra: pip check must say only that.
.venv/bin/python -m pip install -q --no-deps "aimet-onnx==2.42.0"
problems=$(.venv/bin/python -m pip check | grep -v "^aimet-onnx 2.42.0 requires onnx2torch, which is not installed.$" || true)
[ -z "$problems" ] || { echo "$problems" >&2; exit 1; }
bash infra/data/fetch.sh  # the second evaluation set and the text pool, into data/
echo "edgeopt installed in .venv ($(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("edgeopt"))'))"
