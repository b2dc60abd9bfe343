"""Stage keys remembered by file stat: reused only while every file and the context are unchanged."""

from __future__ import annotations

import os
import time

from flows.key_memo import remembered_key


class Counting:
    """A stand-in for `stage_key`: counts how often the key had to be computed from content."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return f"key-{self.calls}"


def aged(path, seconds: float = 60):
    """Set the file's times `seconds` into the past, as a file written in an earlier run."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_a_key_is_remembered_until_a_file_or_the_context_changes(tmp_path):
    store = tmp_path / "memo.sqlite"
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights-1")
    aged(model)
    folder = tmp_path / "calibration"
    folder.mkdir()
    (folder / "rows.csv").write_text("a,b\n")
    aged(folder / "rows.csv")
    compute = Counting()
    files, context = [model, folder], {"params": {"bits": 8}}

    first = remembered_key(files, context, compute, store)
    assert remembered_key(files, context, compute, store) == first and compute.calls == 1

    assert remembered_key(files, {"params": {"bits": 16}}, compute, store) == "key-2"  # other params
    model.write_bytes(b"weights-2")  # same size, rewritten: its mtime moves
    aged(model, 30)
    assert remembered_key(files, context, compute, store) == "key-3"
    (folder / "more.csv").write_text("c\n")  # a file added inside a folder input
    aged(folder / "more.csv")
    assert remembered_key(files, context, compute, store) == "key-4"
    assert remembered_key(files, context, compute, store) == "key-4" and compute.calls == 4


def test_a_file_written_just_now_is_never_relied_on(tmp_path):
    fresh = tmp_path / "model.onnx"
    fresh.write_bytes(b"weights")
    compute = Counting()
    remembered_key([fresh], {}, compute, tmp_path / "memo.sqlite")
    remembered_key([fresh], {}, compute, tmp_path / "memo.sqlite")
    assert compute.calls == 2


def test_a_missing_file_or_an_unusable_memo_falls_back_to_computing(tmp_path):
    compute = Counting()
    assert remembered_key([tmp_path / "absent"], {}, compute, tmp_path / "memo.sqlite") == "key-1"
    model = tmp_path / "model.onnx"
    model.write_bytes(b"w")
    aged(model)
    not_a_database = tmp_path / "memo-dir"
    not_a_database.mkdir()
    assert remembered_key([model], {}, compute, not_a_database) == "key-2"
    assert remembered_key([model], {}, compute, not_a_database) == "key-3"
