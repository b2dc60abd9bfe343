"""The DVC remote in .dvc/config: after a pipeline run, `dvc push`; a fresh clone of the project
then gets every artifact back with `dvc pull`, byte for byte, and `dvc status` is clean."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from conftest import REPO, tiny_params, write_params

from flows.pipeline import pipeline


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_push_then_fresh_clone_pulls_every_artifact_and_is_clean(workspace, tiny_bert, tmp_path):
    shutil.copy2(REPO / ".dvc" / "config", workspace / ".dvc" / "config")  # the project's remote
    write_params(workspace, tiny_params(tiny_bert, seq_lens=[16]))
    assert pipeline(project_dir=str(workspace))["dvc_synced"]
    run("git", "add", "-A", cwd=workspace)
    run("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "tiny run", cwd=workspace)
    assert "pushed" in run("dvc", "push", cwd=workspace)
    remote = tmp_path / "edgeopt-dvc-remote"  # beside the checkout, not in it
    assert (remote / "files" / "md5").is_dir()

    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(workspace), str(clone), cwd=tmp_path)
    assert not (clone / "artifacts").exists()
    run("dvc", "pull", cwd=clone)
    assert digests(clone / "artifacts") == digests(workspace / "artifacts")
    assert len(digests(clone / "artifacts")) > 10
    assert "Data and pipelines are up to date." in run("dvc", "status", cwd=clone)
