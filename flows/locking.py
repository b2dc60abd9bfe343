"""One run at a time per project: a second `edgeopt run`/`edgeopt stage` waits, and says why."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
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


SCRATCH = Path(".edgeopt") / "tmp"


@contextlib.contextmanager
def run_scratch(root: Path) -> Iterator[Path]:
    """A temp folder for one run, under the project, used by everything the run starts (TMPDIR): a run killed
    mid-stage leaves it behind, and the next run removes it (its pid is gone) instead of leaving /tmp to fill."""
    base = Path(root) / SCRATCH
    base.mkdir(parents=True, exist_ok=True)
    for folder in base.iterdir():
        if folder.name.isdigit() and not _alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
    scratch = base / str(os.getpid())
    scratch.mkdir(exist_ok=True)
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(scratch), str(scratch)
    try:
        yield scratch
    finally:
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        tempfile.tempdir = saved[1]
        shutil.rmtree(scratch, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
