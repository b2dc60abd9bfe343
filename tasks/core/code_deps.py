"""A module's code dependencies inside the project: its import closure, computed, never listed by hand.

A stage's cache key (Prefect) and its `deps` in dvc.yaml (DVC) both come from here, so editing any
function a stage reaches, however indirectly, reruns that stage. Imports are read from the source
(every `import` / `from ... import` statement, at any depth, relative ones resolved), so nothing is run.
Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`: they are part of the closure.
Registry entries (`tasks.core.registry`) are loaded by name at run time; callers add the entry's module
(`Registry.module_of`) to the roots, which is exactly the device, recipe or family an instance uses.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGES = ("tasks",)
"""Top-level packages whose modules count as project code."""


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


@cache
def _module_file(module: str) -> Path | None:
    """The source file of `module` if it is project code (package `__init__.py` or module `.py`)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = project_root().joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _direct_imports(module: str) -> tuple[str, ...]:
    """Project modules that `module`'s source imports (parents included), in order of appearance."""
    path = _module_file(module)
    if path is None:
        return ()
    stat = path.stat()
    return _parse_imports(module, path, stat.st_mtime_ns, stat.st_size)


@cache
def _parse_imports(module: str, path: Path, mtime_ns: int, size: int) -> tuple[str, ...]:
    """(mtime, size) are part of the cache key: an edited file is parsed again."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # `from pkg import name`: name may be a submodule or an attribute; keep what is a module.
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            for candidate in _with_parents(name):
                if _module_file(candidate) is not None and candidate not in found:
                    found.append(candidate)
    return tuple(found)


def import_closure(modules: Iterable[str]) -> list[str]:
    """Every project module reachable from `modules` by imports (themselves and their parents included)."""
    seen: list[str] = []
    stack = [m for root in modules for m in _with_parents(root)]
    while stack:
        module = stack.pop()
        if module in seen or _module_file(module) is None:
            continue
        seen.append(module)
        stack.extend(_direct_imports(module))
    return sorted(seen)


def code_files(modules: Iterable[str]) -> list[str]:
    """The closure as project-relative posix paths (what dvc.yaml lists and the cache key hashes)."""
    root = project_root()
    return sorted(_module_file(m).relative_to(root).as_posix() for m in import_closure(modules))
