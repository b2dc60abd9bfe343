"""Stage keys remembered by the stat of the files they hash, so a no-op run does not read GBs again.

A stage key (`tasks.core.fingerprint.stage_key`) hashes the content of the stage's code and input files:
on the default job that is every artifact, ~2.5 GB, on every run. As DVC's state database does for file
hashes, a key is remembered here against the (size, mtime, inode) of every file it read plus everything
else it covers (tools, params, the stage call itself); while none of that changed, the remembered key is
used. Files modified in the last `RACY_NS` are never relied on: file times advance in coarse ticks, so a
same-size rewrite within one tick keeps its stat (git's "racily clean" case). The memo is per project
(`.edgeopt/`); a memo that cannot be opened or written only costs the hashing it would have saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

KEY_MEMO = Path(".edgeopt") / "stage-keys.sqlite"
RACY_NS = 2_000_000_000
DB_TIMEOUT_S = 30


def _stats(paths: Iterable[Path]) -> list[list] | None:
    """[path, size, mtime_ns, inode] of every file named or inside a folder named; None if one is missing."""
    rows = []
    for path in paths:
        path = Path(os.path.abspath(path))  # not resolve(): it lstat()s every component of every path
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            return None
        for file in files:
            stat = file.stat()
            rows.append([file.as_posix(), stat.st_size, stat.st_mtime_ns, stat.st_ino])
    return rows


def _connect(store: Path) -> sqlite3.Connection:
    store.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(store, timeout=DB_TIMEOUT_S)
    con.execute("CREATE TABLE IF NOT EXISTS stage_keys (signature TEXT PRIMARY KEY, key TEXT NOT NULL)")
    return con


def remembered_key(files: Iterable[Path], context: dict[str, Any], compute: Callable[[], str],
                   store: Path = KEY_MEMO) -> str:
    """`compute()`, or the key it returned before for the same `context` and the same stat of `files`."""
    stats = _stats(files)
    if stats is None:  # a missing input: computing the key reports it
        return compute()
    signature = hashlib.sha256(json.dumps({"files": stats, **context}, sort_keys=True).encode()).hexdigest()
    try:
        con = _connect(Path(store))
    except (OSError, sqlite3.Error):
        return compute()
    with contextlib.closing(con):
        try:
            row = con.execute("SELECT key FROM stage_keys WHERE signature = ?", (signature,)).fetchone()
        except sqlite3.Error:
            row = None
        if row is not None:
            return row[0]
        key = compute()
        if all(time.time_ns() - mtime_ns > RACY_NS for _, _, mtime_ns, _ in stats):
            with contextlib.suppress(sqlite3.Error), con:
                con.execute("INSERT OR REPLACE INTO stage_keys VALUES (?, ?)", (signature, key))
    return key
