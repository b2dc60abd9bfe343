"""Stage benchmark: latency, start-up, memory, size and STS-B accuracy of one target's artifacts.

One stage instance per (model, target, seq_len), where a target is a (variant, device) pair. What it
measures depends on the compile jobs for the same (variant, device):
- none: the quantize output itself, as target `host`;
- some: each compiled artifact (an OpenVINO blob, a QNN EPContext model), one row per compile
  target (e.g. `snapdragon_8_gen_3`); a job the compile stage skipped (no such device here) is
  listed under `skipped` in stage.json instead.

Measurement (`tasks.bench_worker`, one fresh process per timing repeat, fixed threads):
- repeat 1 starts with an empty engine cache: `cold_start_ms` = load + compile + first run;
  repeats 2..N start with the cache repeat 1 left (OpenVINO CACHE_DIR; ONNX Runtime, blobs and QNN
  contexts have no engine cache, so only the OS file cache is warm): `warm_start_ms` is their median;
- each repeat times `timed_runs` runs after `warmup_runs`; percentiles pool every repeat, and
  `latency_p50_spread_pct` = (max - min) / median of the repeats' p50s says how far a p50 can be
  trusted (`latency_stable`: within `p50_spread_tolerance_pct`);
- repeat 1 also embeds every unique STS-B test sentence: Spearman x100 of the pair cosines against
  the gold scores, and cosine to the fp32 reference (stage `reference`).
On a simulator (QNN HTP on x86-64, seconds per inference) the accuracy columns come from the
identical QDQ graph on the ONNX Runtime CPU EP over the whole test split (`accuracy_source`
cpu_ep_same_graph), and the compiled context runs on the simulator over the first
`simulator_pairs` pairs: `sim_stsb_spearman` over those pairs and `sim_cosine_to_cpu_ep_*`, its
agreement with the CPU EP on the same sentences. Simulator timings are a few runs in one process and
are labelled `simulated`: never device latency.

Reads: the quantize output, the compile outputs of this target, the tokenizer from the fetched model
folder, the STS-B test split and the fp32 reference embeddings. Writes: `<out>/embeddings-<target>.npy`
(simulated targets: `embeddings-cpu_ep.npy` and `embeddings-<target>-simulator.npy`) and
`<out>/stage.json` whose `rows` are rows of `metrics/benchmark.csv`.
"""

from __future__ import annotations

import hashlib
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from tasks.backends import get_backend
from tasks.bench_worker import launch_worker
from tasks.config import BenchmarkParams
from tasks.errors import BackendUnavailableError, BenchmarkError, StageError
from tasks.export_onnx import tokenize
from tasks.fingerprint import atomic_output_dir, file_sha256, read_stamp, tool_versions, write_stamp
from tasks.stsb import read_pairs, unique_sentences

TOOLS = ("onnxruntime", "transformers", "scipy", "numpy")
HOST = "host"
"""`target` of a row that measured the quantize output as it is (no compile job for its variant and device)."""
CPU_EP_DEVICE = "ort_cpu"
SIMULATOR_WARMUP_RUNS = 1  # seconds per run on a simulator: one untimed run after the first is enough
# ISA extensions that decide which kernels an engine picks (int8 dot products, bf16/AMX tiles).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class Plan:
    """The run counts one benchmark uses: the params, or their quick-mode replacements."""

    warmup_runs: int
    timed_runs: int
    repeats: int
    stsb_pairs: int | None
    simulator_pairs: int
    quick: bool


def plan(params: BenchmarkParams, seq_len: int) -> Plan:
    sim_pairs = params.simulator_pairs
    if seq_len > params.simulator_pairs_seq_len:  # simulator time grows with length: keep it about constant
        sim_pairs = max(2, sim_pairs * params.simulator_pairs_seq_len // seq_len)
    if not params.quick:
        return Plan(params.warmup_runs, params.timed_runs, params.repeats, params.stsb_pairs, sim_pairs, False)
    pairs = min(params.stsb_pairs or params.quick_stsb_pairs, params.quick_stsb_pairs)
    return Plan(
        warmup_runs=params.warmup_runs,
        timed_runs=params.quick_timed_runs,
        repeats=params.quick_repeats,
        stsb_pairs=pairs,
        simulator_pairs=min(sim_pairs, params.quick_simulator_pairs),
        quick=True,
    )


def host_cpu() -> tuple[str, str | None]:
    """CPU model name and its inference-relevant ISA flags (Linux /proc/cpuinfo; elsewhere no flags)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return platform.processor() or platform.machine(), None
    fields = dict(line.split(":", 1) for line in info if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), " ".join(f for f in CPU_FLAGS if f in flags)


def model_files(artifact: Path) -> list[Path]:
    """The files a deployable model is made of: an OpenVINO IR `.xml` keeps its weights in the `.bin`
    beside it; a QNN EPContext model references its context binaries; a blob needs its plugin config."""
    artifact = Path(artifact)
    weights = artifact.with_suffix(".bin")
    if artifact.suffix == ".xml" and weights.is_file():
        return [artifact, weights]
    if artifact.suffix == ".blob":
        config = artifact.with_name("ov_config.json")
        return [artifact, config] if config.is_file() else [artifact]
    if artifact.suffix == ".onnx":
        return [artifact, *_context_binaries(artifact)]
    return [artifact]


def _context_binaries(artifact: Path) -> list[Path]:
    import onnx

    graph = onnx.load(str(artifact), load_external_data=False).graph
    found = []
    for node in graph.node:
        if node.op_type != "EPContext":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ref = attrs.get("ep_cache_context")
        embedded = int(attrs.get("embed_mode", 1)) == 1
        if ref and not embedded:
            path = artifact.with_name(ref.decode() if isinstance(ref, bytes) else str(ref))
            if path.is_file() and path not in found:
                found.append(path)
    return found


def model_sha256(files: list[Path]) -> str:
    """The file's sha256, or for a multi-file model the sha256 of its files' sha256s in order."""
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _spearman(emb: np.ndarray, left: np.ndarray, right: np.ndarray, gold: np.ndarray) -> float:
    return float(spearmanr(_cosines(emb[left], emb[right]), gold).statistic * 100)


@dataclass(frozen=True)
class _Job:
    target: str
    artifact: Path
    versions: dict[str, str]


def compiled_jobs(compiled: dict[str, Path]) -> tuple[list[_Job], list[dict]]:
    """The compiled artifacts of this target's compile jobs, and the jobs the compile stage skipped."""
    jobs, skipped = [], []
    for target, folder in compiled.items():
        stamp = read_stamp(folder)
        if not stamp or "status" not in stamp:
            raise StageError(f"{folder}: no finished compile (stage.json missing); run its compile stage first")
        if stamp["status"] != "compiled":
            skipped.append({"target": target, "status": stamp["status"]})
            continue
        jobs.append(_Job(target, Path(folder) / stamp["artifact"], dict(stamp.get("versions") or {})))
    return jobs, skipped


class WorkerPool:
    """Starts bench workers (one process each) for one stage, sharing its feeds file and scratch folder."""

    def __init__(self, tmp: Path, feeds: dict[str, np.ndarray], threads: int, timeout_s: float):
        self.tmp, self.threads, self.timeout_s, self.count = tmp, threads, timeout_s, 0
        self.feeds = self.save_feeds("feeds", feeds)

    def save_feeds(self, name: str, feeds: dict[str, np.ndarray]) -> Path:
        path = self.tmp / f"{name}.npz"
        np.savez(path, **feeds)
        return path

    def run(self, device: str, artifact: Path, *, warmup: int, timed: int, embeddings: Path | None = None,
            feeds: Path | None = None, cache_dir: Path | None = None, label: str = "") -> dict:
        self.count += 1
        return launch_worker(
            {
                "backend": device,
                "artifact": str(Path(artifact).resolve()),
                "threads": self.threads,
                "warmup_runs": warmup,
                "timed_runs": timed,
                "feeds": str(feeds or self.feeds),
                "result": str(self.tmp / f"result{self.count}.json"),
                "embeddings": str(embeddings) if embeddings else None,
                "cache_dir": str(cache_dir) if cache_dir else None,
                "label": label,
            },
            self.timeout_s,
        )


def timing_columns(repeats: list[dict], tolerance_pct: float) -> dict:
    """Latency columns from the workers of one artifact: the first started with an empty engine cache."""
    blocks = [np.asarray(r["latencies_ms"]) for r in repeats]
    lat = np.concatenate(blocks)
    p50s = [float(np.percentile(b, 50)) for b in blocks]
    spread = (max(p50s) - min(p50s)) / float(np.median(p50s)) * 100 if len(p50s) > 1 else None
    return {
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p90_ms": float(np.percentile(lat, 90)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
        "latency_mean_ms": float(lat.mean()),
        "latency_std_ms": float(lat.std()),
        "timed_runs": len(lat),
        "cold_start_ms": float(repeats[0]["start_ms"]),
        "timing_repeats": len(repeats),
        "latency_p50_spread_pct": spread,
        "latency_stable": spread is not None and spread <= tolerance_pct,
        "throughput_per_s": 1e3 / float(lat.mean()),  # batch 1, one stream: inferences per second
        "warm_start_ms": float(np.median([r["start_ms"] for r in repeats[1:]])) if len(repeats) > 1 else None,
        "peak_rss_mb": max(float(r["peak_rss_mb"]) for r in repeats),
        "precision": repeats[0]["precision"],
        "engine_version": repeats[0]["engine_version"],
    }


def run(
    *,
    artifact: Path,
    model_dir: Path,
    stsb_test: Path,
    reference_embeddings: Path,
    source_model: str,
    model: str,
    variant: str,
    device: str,
    seq_len: int,
    stage_name: str,
    params: BenchmarkParams,
    out_dir: Path,
    key: str,
    compiled: dict[str, Path] | None = None,
) -> dict:
    """Benchmark `artifact` (the quantize output) on `device`, or the compiled artifacts in `compiled`
    (compile target -> compile stage folder) when this (variant, device) has compile jobs."""
    from transformers import AutoTokenizer

    backend = get_backend(device)
    simulated = bool(getattr(backend, "simulated", False))
    how = plan(params, seq_len)
    pairs = read_pairs(stsb_test, limit=how.stsb_pairs)
    sentences, left, right = unique_sentences(pairs)
    gold = pairs["score"].to_numpy()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    feeds = tokenize(tokenizer, sentences, seq_len)
    reference = np.load(reference_embeddings)

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

    def accuracy(emb: np.ndarray) -> dict:
        n = min(len(reference), len(emb))  # both are prefixes of the same sentence order
        if reference.shape[1] != emb.shape[1]:
            raise BenchmarkError(
                f"{reference_embeddings}: width {reference.shape[1]} differs from this model's {emb.shape[1]}"
            )
        cos = _cosines(emb[:n], reference[:n])
        return {"stsb_pairs": len(pairs), "stsb_spearman": _spearman(emb, left, right, gold),
                "cosine_to_fp32_mean": float(cos.mean()), "cosine_to_fp32_min": float(cos.min())}

    def files_columns(path: Path, versions: dict[str, str], engine: str) -> dict:
        files = model_files(path)
        tools = {**tool_versions(TOOLS), backend.engine_package: engine, **versions}
        return {"artifact": Path(path).as_posix(), "artifact_sha256": model_sha256(files),
                "size_mb": sum(f.stat().st_size for f in files) / 1e6,
                "tool_versions": "; ".join(f"{k} {v}" for k, v in sorted(tools.items()))}

    rows = []
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        workers = WorkerPool(tmp, feeds, params.threads, params.worker_timeout_s)
        if simulated and jobs:
            # The source of every compiled context: the same QDQ graph, on the CPU EP, whole test split.
            cpu_emb_path = scratch / "embeddings-cpu_ep.npy"
            workers.run(CPU_EP_DEVICE, Path(artifact), warmup=0, timed=0, embeddings=cpu_emb_path,
                        label=f"{variant} on the CPU EP")
            cpu_emb = np.load(cpu_emb_path)
            sub = pairs.head(how.simulator_pairs)
            sub_sentences, sub_left, sub_right = unique_sentences(sub)
            sub_feeds = workers.save_feeds("simulator-feeds", {k: v[: len(sub_sentences)] for k, v in feeds.items()})
            for job in jobs:
                sim_path = scratch / f"embeddings-{job.target}-simulator.npy"
                measured = workers.run(device, job.artifact, warmup=SIMULATOR_WARMUP_RUNS,
                                       timed=params.simulator_timed_runs, embeddings=sim_path, feeds=sub_feeds,
                                       label=f"{variant} {job.target} (simulator)")
                sim_emb = np.load(sim_path)
                agreement = _cosines(sim_emb, cpu_emb[: len(sim_emb)])
                timing = timing_columns([measured], params.p50_spread_tolerance_pct)
                rows.append({
                    **common, **files_columns(job.artifact, job.versions, timing["engine_version"]), **timing,
                    **accuracy(cpu_emb), "target": job.target, "accuracy_source": "cpu_ep_same_graph",
                    "sim_pairs": len(sub), "sim_stsb_spearman": _spearman(sim_emb, sub_left, sub_right,
                                                                          sub["score"].to_numpy()),
                    "sim_cosine_to_cpu_ep_mean": float(agreement.mean()),
                    "sim_cosine_to_cpu_ep_min": float(agreement.min()),
                })
        else:
            for job in jobs:
                emb_path = scratch / f"embeddings-{job.target}.npy"
                cache = tmp / f"engine-cache-{job.target}"  # empty for repeat 1, filled by it for the rest
                repeats = [
                    workers.run(device, job.artifact, warmup=how.warmup_runs, timed=how.timed_runs,
                                embeddings=emb_path if i == 0 else None, cache_dir=cache,
                                label=f"{variant} {device} {job.target} L={seq_len} repeat {i + 1}/{how.repeats}")
                    for i in range(how.repeats)
                ]
                timing = timing_columns(repeats, params.p50_spread_tolerance_pct)
                rows.append({
                    **common, **files_columns(job.artifact, job.versions, timing["engine_version"]), **timing,
                    **accuracy(np.load(emb_path)), "target": job.target, "accuracy_source": "artifact",
                    "sim_pairs": None, "sim_stsb_spearman": None, "sim_cosine_to_cpu_ep_mean": None,
                    "sim_cosine_to_cpu_ep_min": None,
                })
        payload = {"rows": rows, "skipped": skipped}
        write_stamp(scratch, key, payload)
    return payload
