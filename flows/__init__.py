"""Orchestration for edgeopt: the Prefect flow, the DVC stage runner and the `edgeopt` CLI."""

import os

# A plain `python` run starts a temporary Prefect server; on 2 cores it can take 10-20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
