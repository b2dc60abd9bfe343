"""Content hashes, stage stamps and atomic outputs: what makes a rerun safe to skip.

A stage's *key* is the sha256 of its source code, the versions of the tools it calls, its params
section and the content of every input file. The stage writes the key into `stage.json` inside its
output folder as the very last step, and the folder appears only by an atomic rename: an output
folder without a matching stamp is never current. The stamp also records each output file's sha256
(with its size and mtime) and a hash of its own payload, so an output edited or truncated after the
stage wrote it is not current either (reuse is verified by content, as DVC does); a file whose size and
mtime are unchanged is not hashed again, so a no-op run stays fast.
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

from tasks.core.errors import StageError

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
    params: Any,
    inputs: dict[str, Path],
    extra: dict[str, Any] | None = None,
) -> str:
    """The cache key shared by the Prefect task and the DVC stage runner."""
    parts: dict[str, Any] = {
        "code": {Path(f).as_posix(): file_sha256(Path(f)) for f in code_files},
        "tools": tool_versions(tools),
        "params": params.model_dump(mode="json") if isinstance(params, BaseModel) else params,
        "inputs": {name: path_sha256(p) for name, p in sorted(inputs.items())},
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_stamp(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out_dir) / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _payload_sha256(stamp: dict[str, Any]) -> str:
    payload = {k: v for k, v in stamp.items() if k not in ("key", "files", "file_hashes", "payload_sha256")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _file_record(path: Path) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, file_sha256(path)]


def changed_files(out_dir: Path, stamp: dict[str, Any]) -> list[str]:
    """Output files (or the stamp's payload) that no longer hold what the stage wrote."""
    changed = [] if stamp.get("payload_sha256") == _payload_sha256(stamp) else ["stage.json"]
    for rel, (size, mtime_ns, sha256) in stamp.get("file_hashes", {}).items():
        path = Path(out_dir) / rel
        try:
            stat = path.stat()
        except OSError:
            changed.append(rel)
            continue
        if stat.st_size != size or (stat.st_mtime_ns != mtime_ns and file_sha256(path) != sha256):
            changed.append(rel)
    return changed


def is_current(out_dir: Path, key: str) -> bool:
    """True when `out_dir` holds a finished output of the stage call whose key is `key`, as it was written."""
    stamp = read_stamp(out_dir)
    if not stamp or stamp.get("key") != key or "file_hashes" not in stamp:
        return False
    return not changed_files(out_dir, stamp)


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
    """Write `stage.json` last: the files the stage produced (with their hashes) and what it measured."""
    files = sorted(p for p in Path(out_dir).rglob("*") if p.is_file() and p.name != STAMP)
    hashes = {p.relative_to(out_dir).as_posix(): _file_record(p) for p in files}
    stamp = {"key": key, "files": sorted(hashes), "file_hashes": hashes, **payload}
    write_json_atomic(Path(out_dir) / STAMP, {**stamp, "payload_sha256": _payload_sha256(stamp)})


def finished_compile(folder: Path) -> dict[str, Any]:
    """A compile stage's stamp (its `status`, and `artifact` when compiled); StageError when it has not finished."""
    stamp = read_stamp(folder)
    if not stamp or "status" not in stamp:
        raise StageError(f"{folder}: no finished compile (stage.json missing); run its compile stage first")
    return stamp


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (a copy across filesystems), its folder made if needed."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def link_output(source: Path, out_dir: Path) -> dict[str, Any]:
    """A finished output of the same stage call (same key) placed at `out_dir`, file by file as hard links
    (copies across filesystems), atomically; returns its payload as the stage returned it."""
    stamp = read_stamp(source) or {}
    with atomic_output_dir(out_dir) as scratch:
        for item in sorted(Path(source).rglob("*")):
            target = scratch / item.relative_to(source)
            if item.is_dir():
                target.mkdir(exist_ok=True)
                continue
            link_or_copy(item, target)
    return {k: v for k, v in stamp.items() if k not in ("key", "files", "file_hashes", "payload_sha256")}
