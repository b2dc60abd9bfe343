"""Stage benchmark: latency, start-up, memory, size and accuracy of one target's artifacts.

One stage instance per (model, target, seq_len), where a target is a (variant, device) pair. What it
measures depends on the compile jobs for the same (variant, device):
- none: the quantize output itself, as target `host`;
- some: each compiled artifact (an OpenVINO blob, a QNN EPContext model), one row per compile
  target (e.g. `snapdragon_8_gen_3`); a job the compile stage skipped (no such device here) is
  listed under `skipped` in stage.json instead.

Measurement (`tasks.backends.worker`, one fresh process per timing repeat, fixed threads):
- repeat 1 starts with an empty engine cache: `cold_start_ms` = load + compile + first run;
  repeats 2..N start with the cache repeat 1 left (OpenVINO CACHE_DIR; ONNX Runtime, blobs and QNN
  contexts have no engine cache, so only the OS file cache is warm): `warm_start_ms` is their median;
- each repeat times `timed_runs` runs after `warmup_runs`; percentiles pool every repeat, and
  `latency_p50_spread_pct` = (max - min) / median of the repeats' p50s says how far a p50 can be
  trusted (`latency_stable`: within `p50_spread_tolerance_pct`);
- repeat 1 also runs every input of every configured evaluation set (`evaluation.sets`): each set's
  metric (`tasks.data.evaluation`), and the cosine of the outputs to the dense fp32 reference (stage
  `reference`). The row carries the first set's metric (`metric_name`, `metric_value`); `evaluations`
  in stage.json carries every set's.
On a simulator (QNN HTP on x86-64, seconds per inference) the accuracy columns come from the identical
QDQ graph on the ONNX Runtime CPU EP over every set (`accuracy_source` cpu_ep_same_graph), and the
compiled context runs on the simulator over the first `simulator_items` items of the first set:
`sim_metric_value` there and `sim_cosine_to_cpu_ep_*`, its agreement with the CPU EP on the same
inputs. Simulator timings are a few runs in one process and are labelled `simulated`: never device latency.

Reads: the quantize output, the compile outputs of this target, the model folder (its preprocessor), the
evaluation sets and the reference outputs. Writes: `<out>/outputs-<target>.npy` (simulated targets:
`outputs-cpu_ep.npy` and `outputs-<target>-simulator.npy`) and `<out>/stage.json` whose `rows` are rows
of `metrics/benchmark.csv`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.backends import get_backend
from tasks.backends.measure import TimingParams, WorkerPool, model_files, model_sha256, timing_columns
from tasks.core.errors import BackendUnavailableError
from tasks.core.fingerprint import atomic_output_dir, finished_compile, tool_versions, write_stamp
from tasks.core.machine import host_cpu
from tasks.core.onnx_graph import row_cosines
from tasks.data import evaluation
from tasks.data.evaluation import EvaluationParams
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings

TOOLS = ("onnxruntime", "transformers", "scipy", "numpy")
HOST = "host"
"""`target` of a row that measured the quantize output as it is (no compile job for its variant and device)."""
CPU_EP_DEVICE = "ort_cpu"
SIMULATOR_WARMUP_RUNS = 1  # seconds per run on a simulator: one untimed run after the first is enough


class BenchmarkParams(TimingParams):
    simulator_items: int = Field(
        32, ge=2, description="items of the first evaluation set a compiled context runs on a simulator"
    )
    simulator_items_seq_len: int = Field(
        128, ge=1, description="above this length the simulator subset shrinks in proportion (same simulator time)"
    )
    simulator_timed_runs: int = Field(3, ge=1, description="timed runs on a simulator (its timings are not device latency)")
    quick: bool = Field(False, description="test mode: quick_* settings, rows marked quick; never for decisions")
    quick_timed_runs: int = Field(10, ge=1)
    quick_repeats: int = Field(2, ge=2)
    quick_eval_items: int = Field(50, ge=2, description="quick mode: first items of every evaluation set")
    quick_simulator_items: int = Field(4, ge=2)

    def timing(self) -> TimingParams:
        """The timing settings alone (what the latency curve shares with the benchmark)."""
        return TimingParams(**{k: getattr(self, k) for k in TimingParams.model_fields})


@dataclass(frozen=True)
class Plan:
    """The run counts one benchmark uses: the params, or their quick-mode replacements."""

    warmup_runs: int
    timed_runs: int
    repeats: int
    eval_limit: int | None
    simulator_items: int
    quick: bool


def plan(params: BenchmarkParams, seq_len: int) -> Plan:
    sim_items = params.simulator_items
    if seq_len > params.simulator_items_seq_len:  # simulator time grows with length: keep it about constant
        sim_items = max(2, sim_items * params.simulator_items_seq_len // seq_len)
    if not params.quick:
        return Plan(params.warmup_runs, params.timed_runs, params.repeats, None, sim_items, False)
    return Plan(
        warmup_runs=params.warmup_runs,
        timed_runs=params.quick_timed_runs,
        repeats=params.quick_repeats,
        eval_limit=params.quick_eval_items,
        simulator_items=min(sim_items, params.quick_simulator_items),
        quick=True,
    )


@dataclass(frozen=True)
class _Job:
    target: str
    artifact: Path
    versions: dict[str, str]


def compiled_jobs(compiled: dict[str, Path]) -> tuple[list[_Job], list[dict]]:
    """The compiled artifacts of this target's compile jobs, and the jobs the compile stage skipped."""
    jobs, skipped = [], []
    for target, folder in compiled.items():
        stamp = finished_compile(folder)
        if stamp["status"] != "compiled":
            skipped.append({"target": target, "status": stamp["status"]})
            continue
        jobs.append(_Job(target, Path(folder) / stamp["artifact"], dict(stamp.get("versions") or {})))
    return jobs, skipped


def run(
    *,
    artifact: Path,
    model_dir: Path,
    reference_outputs: Path,
    source_model: str,
    model: str,
    variant: str,
    device: str,
    seq_len: int,
    stage_name: str,
    params: BenchmarkParams,
    evaluation_params: EvaluationParams,
    family: FamilySettings,
    out_dir: Path,
    key: str,
    compiled: dict[str, Path] | None = None,
) -> dict:
    """Benchmark `artifact` (the quantize output) on `device`, or the compiled artifacts in `compiled`
    (compile target -> compile stage folder) when this (variant, device) has compile jobs."""
    backend = get_backend(device)
    impl = FAMILIES.get(family.name)
    simulated = bool(getattr(backend, "simulated", False))
    how = plan(params, seq_len)
    classes = impl.class_names(Path(model_dir))
    sets = [evaluation.load(s, classes, limit=how.eval_limit) for s in evaluation_params.sets]
    scorer = evaluation.Scorer(sets, np.load(reference_outputs), Path(reference_outputs), evaluation_params.sets)
    preprocessor = impl.load_preprocessor(Path(model_dir))
    feeds = impl.samples(preprocessor, scorer.inputs, seq_len)

    if compiled:
        jobs, skipped = compiled_jobs(compiled)
    else:
        jobs, skipped = [_Job(HOST, Path(artifact), {})], []
    if jobs:
        reason = backend.unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"device {device}: {reason}")

    cpu_model, cpu_flags = host_cpu()
    common = {
        "model": model, "source_model": source_model, "variant": variant, "device": device, "seq_len": seq_len,
        "threads": params.threads, "dvc_stage": stage_name, "simulated": simulated, "quick": how.quick,
        "cpu_model": cpu_model, "cpu_flags": cpu_flags,
    }

    def files_columns(path: Path, versions: dict[str, str], engine: str) -> dict:
        files = model_files(path)
        tools = {**tool_versions(TOOLS), backend.engine_package: engine, **versions}
        return {"artifact": Path(path).as_posix(), "artifact_sha256": model_sha256(files),
                "size_mb": sum(f.stat().st_size for f in files) / 1e6,
                "tool_versions": "; ".join(f"{k} {v}" for k, v in sorted(tools.items()))}

    rows, evaluations = [], []

    def add(row: dict, outputs: np.ndarray, source: str) -> None:
        scores = scorer.evaluations(outputs, source)
        rows.append({**row, **scorer.columns(outputs, scores), "accuracy_source": source})
        evaluations.extend({**{k: row[k] for k in ("model", "variant", "device", "target", "seq_len")}, **s}
                           for s in scores)

    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        workers = WorkerPool(tmp, feeds, params.threads, params.worker_timeout_s)
        if simulated and jobs:
            # The source of every compiled context: the same QDQ graph, on the CPU EP, every evaluation set.
            cpu_out_path = scratch / "outputs-cpu_ep.npy"
            workers.run(CPU_EP_DEVICE, Path(artifact), warmup=0, timed=0, outputs=cpu_out_path,
                        label=f"{variant} on the CPU EP")
            cpu_out = np.load(cpu_out_path)
            sub = sets[0].subset(how.simulator_items)
            sub_feeds = workers.save_feeds("simulator-feeds", {k: v[: len(sub.inputs)] for k, v in feeds.items()})
            for job in jobs:
                sim_path = scratch / f"outputs-{job.target}-simulator.npy"
                measured = workers.run(device, job.artifact, warmup=SIMULATOR_WARMUP_RUNS,
                                       timed=params.simulator_timed_runs, outputs=sim_path, feeds=sub_feeds,
                                       label=f"{variant} {job.target} (simulator)")
                sim_out = np.load(sim_path)
                agreement = row_cosines(sim_out.reshape(len(sim_out), -1), cpu_out[: len(sim_out)].reshape(len(sim_out), -1))
                timing = timing_columns([measured], params.p50_spread_tolerance_pct)
                add({**common, **files_columns(job.artifact, job.versions, timing["engine_version"]), **timing,
                     "target": job.target, "sim_items": sub.items, "sim_metric_value": scorer.score(sub, sim_out),
                     "sim_cosine_to_cpu_ep_mean": float(agreement.mean()),
                     "sim_cosine_to_cpu_ep_min": float(agreement.min())},
                    cpu_out, "cpu_ep_same_graph")
        else:
            for job in jobs:
                out_path = scratch / f"outputs-{job.target}.npy"
                cache = tmp / f"engine-cache-{job.target}"  # empty for repeat 1, filled by it for the rest
                repeats = [
                    workers.run(device, job.artifact, warmup=how.warmup_runs, timed=how.timed_runs,
                                outputs=out_path if i == 0 else None, cache_dir=cache,
                                label=f"{variant} {device} {job.target} L={seq_len} repeat {i + 1}/{how.repeats}")
                    for i in range(how.repeats)
                ]
                timing = timing_columns(repeats, params.p50_spread_tolerance_pct)
                add({**common, **files_columns(job.artifact, job.versions, timing["engine_version"]), **timing,
                     "target": job.target, "sim_items": None, "sim_metric_value": None,
                     "sim_cosine_to_cpu_ep_mean": None, "sim_cosine_to_cpu_ep_min": None},
                    np.load(out_path), "artifact")
        payload = {"rows": rows, "evaluations": evaluations, "skipped": skipped}
        write_stamp(scratch, key, payload)
    return payload
