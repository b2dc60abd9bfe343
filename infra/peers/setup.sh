#!/usr/bin/env bash
# Create the peers venv (default .venv-peers/ in the project, override with PEERS_VENV) and install the peer tools with the
# exact pins of infra/peers/requirements.txt. Idempotent. Separate from the project's .venv on purpose: the peer
# tools need transformers 4.57 / optimum 2.1 while edgeopt runs transformers 5.x.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${PEERS_VENV:-.venv-peers}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned, as infra/setup.sh does: pip takes the CPU build 2.13.0+cpu that this kind of machine keeps
# on disk (pip's find-links); an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -r infra/peers/requirements.txt
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -c 'import torch, sys; sys.exit("torch is not the CPU build: " + torch.__version__) if torch.version.cuda else None'
echo "peers venv ready: $VENV ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(", ".join(p + " " + m.version(p) for p in ("sentence-transformers", "olive-ai", "optimum-intel", "optimum-onnx", "onnxruntime", "openvino", "nncf", "torch", "transformers")))'))"
