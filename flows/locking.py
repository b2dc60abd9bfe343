"""One run at a time per project: a second `edgeopt run`/`edgeopt stage` waits, and says why."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = Path(".edgeopt") / "run.lock"


@contextlib.contextmanager
def workspace_lock(root: Path, on_wait: Callable[[str], None] = print, poll_s: float = 1.0) -> Iterator[None]:
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    on_wait(f"{path}: held by {holder}; waiting for it to finish (Ctrl-C to stop)")
                    told = True
                time.sleep(poll_s)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
