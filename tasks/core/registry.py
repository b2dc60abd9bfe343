"""Name -> "module:attribute" registries, imported only when an entry is used.

Devices (backends), quantization recipes and model families are each one module plus one line in their
registry, so a machine without a vendor SDK still runs everything else, and a stage's code key can name
exactly the module an instance uses (`module_of`).
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

from tasks.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def module_of(self, name: str) -> str:
        """The module that defines entry `name` (what its users' code keys must include)."""
        return self._entry(name).partition(":")[0]

    def get(self, name: str) -> T:
        module, _, attr = self._entry(name).partition(":")
        return getattr(importlib.import_module(module), attr)

    def all(self) -> dict[str, T]:
        return {name: self.get(name) for name in self._entries}

    def _entry(self, name: str) -> str:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}") from None
