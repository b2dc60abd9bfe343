"""One small error tree. Each message says what is wrong, where, and how to fix it.

Entry points (the CLI and the DVC stage runner) catch `EdgeoptError` and print its message on one
line; anything else is a bug and keeps its traceback.
"""


class EdgeoptError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(EdgeoptError):
    """`params.yaml` (or an override) is invalid."""


class InputError(EdgeoptError):
    """An input file or folder (model, data) is missing or unusable."""


class StageError(EdgeoptError):
    """A stage ran but its result failed a check (e.g. export disagrees with torch)."""


class BackendUnavailableError(EdgeoptError):
    """A device backend cannot run on this machine."""


class BenchmarkError(EdgeoptError):
    """A benchmark worker failed."""


class ServiceError(EdgeoptError):
    """A local service (MLflow server, Prefect server or worker) cannot start, stop or be reached."""
