"""Atomic outputs and stamps: a crash never leaves something that looks finished."""

from __future__ import annotations

import pytest

from tasks.core.fingerprint import atomic_output_dir, is_current, path_sha256, write_stamp


def test_failed_write_keeps_previous_output_and_leaves_no_scratch(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as scratch:
        (scratch / "model.onnx").write_text("v1")
        write_stamp(scratch, "k1", {})
    with pytest.raises(RuntimeError), atomic_output_dir(out) as scratch:
        (scratch / "model.onnx").write_text("half")
        raise RuntimeError("killed")
    assert (out / "model.onnx").read_text() == "v1"
    assert is_current(out, "k1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_run_are_cleared(tmp_path):
    (tmp_path / ".out.tmp-abc").mkdir()
    (tmp_path / ".out.tmp-abc" / "model.onnx").write_text("partial")
    with atomic_output_dir(tmp_path / "out") as scratch:
        write_stamp(scratch, "k", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stamp_must_match_key_and_files_must_exist(tmp_path):
    with atomic_output_dir(tmp_path / "out") as scratch:
        (scratch / "a.bin").write_bytes(b"x")
        write_stamp(scratch, "k", {"metric": 1})
    assert is_current(tmp_path / "out", "k")
    assert not is_current(tmp_path / "out", "other")
    (tmp_path / "out" / "a.bin").unlink()
    assert not is_current(tmp_path / "out", "k")


def test_folder_hash_depends_on_names_and_content(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("1")
    h1 = path_sha256(tmp_path / "d")
    (tmp_path / "d" / "a").write_text("2")
    h2 = path_sha256(tmp_path / "d")
    (tmp_path / "d" / "a").rename(tmp_path / "d" / "b")
    assert len({h1, h2, path_sha256(tmp_path / "d")}) == 3
