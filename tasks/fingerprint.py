"""Content hashes, stage stamps and atomic outputs: what makes a rerun safe to skip.

A stage's *key* is the sha256 of its source code, the versions of the tools it calls, its params
section and the content of every input file. The stage writes the key into `stage.json` inside its
output folder as the very last step, and the folder appears only by an atomic rename: an output
folder without a matching stamp is never current.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

STAMP = "stage.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def path_sha256(path: Path) -> str:
    """Hash of a file's bytes, or of a folder's relative names and file hashes (sorted)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    h = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(child.relative_to(path).as_posix().encode())
        h.update(file_sha256(child).encode())
    return h.hexdigest()


def tool_versions(packages: Iterable[str]) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not-installed"
    return versions


def stage_key(
    *,
    code_files: Iterable[Path],
    tools: Iterable[str],
    params: BaseModel | None,
    inputs: dict[str, Path],
    extra: dict[str, Any] | None = None,
) -> str:
    """The cache key shared by the Prefect task and the DVC stage runner."""
    parts: dict[str, Any] = {
        "code": {Path(f).name: file_sha256(Path(f)) for f in code_files},
        "tools": tool_versions(tools),
        "params": params.model_dump(mode="json") if params is not None else None,
        "inputs": {name: path_sha256(p) for name, p in sorted(inputs.items())},
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_stamp(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out_dir) / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(out_dir: Path, key: str) -> bool:
    """True when `out_dir` holds a finished output of the stage call whose key is `key`."""
    stamp = read_stamp(out_dir)
    if not stamp or stamp.get("key") != key:
        return False
    return all((Path(out_dir) / rel).exists() for rel in stamp.get("files", []))


def write_json_atomic(path: Path, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a scratch folder beside `out_dir`; on success it replaces `out_dir` in one rename.

    On any error the scratch folder is removed and the previous `out_dir` (if any) is left alone,
    so a crash never leaves a half-written output where a finished one is expected.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a run killed mid-write (runs of one project are serialised by a lock).
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    scratch.chmod(0o755)  # mkdtemp makes 0700; outputs should read like any other folder
    try:
        yield scratch
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "x")
        os.replace(scratch, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def write_stamp(out_dir: Path, key: str, payload: dict[str, Any]) -> None:
    """Write `stage.json` last: it lists the files the stage produced and the metrics it measured."""
    files = sorted(p.relative_to(out_dir).as_posix() for p in Path(out_dir).rglob("*") if p.is_file())
    write_json_atomic(Path(out_dir) / STAMP, {"key": key, "files": files, **payload})
