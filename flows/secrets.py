"""Secrets never reach MLflow params, tags, artifacts or messages: what they look like, and how they are masked.

Credentials belong in the environment of the process that needs them (MLFLOW_TRACKING_USERNAME/PASSWORD,
HF_TOKEN, the store's own variables), not in params.yaml; when one is there anyway, it is masked wherever
edgeopt writes the config or a URL: a `user:password@` in a URL, a value under a key that names a secret
(token, password, secret, api key, credential), and token-shaped strings (Hugging Face `hf_...`, bearer
tokens, AWS access keys).
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
_URL_PASSWORD = re.compile(r"(?<=://)([^/:@\s]+):[^/@\s]+@")
_SECRET_KEY = re.compile(r"(?i)(token|passw(or)?d|secret|api[_-]?key|credential)")
_TOKENS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
)
_ASSIGNMENT = re.compile(r"(?i)\b([A-Za-z_]*(token|passw(or)?d|secret|api[_-]?key)[A-Za-z_]*)\s*([=:])\s*([^\s,;]+)")


def redact(text: str) -> str:
    """`text` with URL passwords, `key=value` secrets and token-shaped strings masked."""
    text = _URL_PASSWORD.sub(rf"\1:{MASK}@", text)
    text = _ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(4)}{MASK}", text)
    for pattern in _TOKENS:
        text = pattern.sub(MASK, text)
    return text


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact_mapping(value: Any) -> Any:
    """A copy of a config mapping with every secret-named key's value masked and every string redacted."""
    if isinstance(value, dict):
        return {k: MASK if is_secret_key(str(k)) and v not in (None, "") else redact_mapping(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_mapping(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def redact_values(mapping: dict[str, Any]) -> dict[str, str]:
    """MLflow tags (or params) as strings, each redacted."""
    return {key: redact(str(value)) for key, value in mapping.items()}


class RedactingFilter(logging.Filter):
    """Masks secrets in every record a handler emits (console, files, Prefect's API log handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


def redact_logs() -> None:
    """Add a `RedactingFilter` to every handler configured so far (root, Prefect's, libraries'): a handler-level
    filter also sees records that propagate up from child loggers, which a logger-level one would not."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers}:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
