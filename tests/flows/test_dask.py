"""Distributed fan-out (issue 7): compile and benchmark stages on a Dask cluster give the same results."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest
import yaml

from flows.pipeline import pipeline

pytest.importorskip("prefect_dask")

# What must not depend on where a stage ran (latencies may).
SAME = {
    "benchmark.csv": ["model", "variant", "device", "target", "seq_len", "artifact_sha256", "metric_value",
                      "cosine_to_fp32_mean", "cosine_to_fp32_min"],
    "compile.csv": ["model", "variant", "device", "target", "seq_len", "status", "npu_nodes", "cpu_fallback_nodes",
                    "verify_min_cosine"],
}


def _results(workspace) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(workspace / "metrics" / name)[cols] for name, cols in SAME.items()}


@pytest.mark.slow  # a minute or more: the tiny DAG several times, or servers
def test_device_stages_run_in_dask_worker_processes_with_the_same_results(workspace):
    from distributed import Client, LocalCluster, get_task_stream

    before = pipeline(project_dir=str(workspace))
    expected = _results(workspace)
    for stage in ("compile", "benchmark"):
        shutil.rmtree(workspace / "artifacts" / stage)

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        params["execution"].update(task_runner="dask", dask_address=cluster.scheduler_address)
        (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        worker_pids = set(client.run(os.getpid).values())
        with get_task_stream(client) as stream:
            after = pipeline(project_dir=str(workspace))

    device_stages = {n for n in before["stages"] if n.startswith(("compile@", "benchmark@"))}
    assert {n for n, s in after["stages"].items() if s != "Cached"} == device_stages | {"report"}
    workers = {task["worker"] for task in stream.data}
    assert len(workers) == 2, "the device stages were spread over both worker processes"
    assert os.getpid() not in worker_pids
    for name, frame in _results(workspace).items():
        pd.testing.assert_frame_equal(frame, expected[name], check_exact=False, rtol=1e-6)
