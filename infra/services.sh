#!/usr/bin/env bash
# Start, stop or check the local services from anywhere: infra/services.sh start|stop|status|env [...]
# (the same as `edgeopt services ...` run in the project root; see infra/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/edgeopt services "$@"
