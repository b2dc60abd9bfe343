"""Prefect caching keyed on content, shared with the DVC stage runner.

The cache key of a stage task is `StageCall.key` (content of inputs + params section + source +
tool versions). A Prefect cache record alone is not enough to skip a stage: the outputs on disk
must carry the same key in their `stage.json`, otherwise the record is dropped and the stage runs
(a deleted or half-written output means rerun, never a stale hit). The DVC runner writes a record
under the same key, so a flow run after `dvc repro` finds everything current too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.logging import get_logger
from prefect.results import ResultStore
from prefect.serializers import JSONSerializer

from flows.stages import StageCall
from tasks.core.fingerprint import changed_files, is_current, read_stamp

RESULTS_DIR = Path(".edgeopt") / "prefect-results"


def results_dir(root: Path | None = None) -> Path:
    """Where Prefect keeps this project's cache records (a Path is a local result storage)."""
    return ((root or Path.cwd()) / RESULTS_DIR).resolve()


class StageCachePolicy(CachePolicy):
    """Key = the stage call's content key (per run folder); valid only while its outputs carry that key and
    still hold what the stage wrote."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any):
        call: StageCall = inputs["call"]
        key = call.cache_key
        if not is_current(call.out_dir, call.key):
            stamp = read_stamp(call.out_dir)
            if stamp and stamp.get("key") == call.key:
                changed = ", ".join(changed_files(call.out_dir, stamp)[:3])
                get_logger("edgeopt").warning(f"{call.name}: {changed} changed since the stage wrote it: rerunning")
            (results_dir() / key).unlink(missing_ok=True)
        return key


def record_result(call: StageCall, result: dict, root: Path | None = None) -> None:
    """Store `result` as the Prefect cache record of `call` (used by the DVC stage runner)."""
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(results_dir(root))), serializer=JSONSerializer())
    store.write(result, key=call.cache_key)
