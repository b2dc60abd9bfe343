"""Stage bundle: one target's artifacts at several lengths as a deployable bundle, timed on the user's inputs.

One stage instance per (model, target). Static shapes make every input pay for the artifact's length; a
bundle (`tasks.runtime.bundle`) holds the target's artifact at each bucket length (`bundle.buckets` for
its device, else every `seq_lens`) and routes each input to the smallest bucket that holds it. For each
compile target of the (variant, device) (or `host`: the quantize output), this stage:
- writes the bundle folder `<out>/<target>/` (manifest, preprocessor, one folder per bucket);
- times it on a seeded sample of the user's inputs (`bundle.mix_samples` of `report.seq_len_choice.text`)
  in a process of its own, through the same `Bundle` class a deployment embeds, interleaved with the
  same artifacts used statically (every input at one bucket length): rows with `policy` buckets or
  static, `latency_mix_mean_ms` / `latency_mix_p99_ms`, and how many inputs each truncates;
- runs every evaluation set through the bundle (routed as deployed) for the buckets row's accuracy; the
  static rows' accuracy is the benchmark's at that length (the report joins it). A target with one bucket
  length gets its static row only (nothing to route).
A variant with `shape: dynamic` is one artifact with a free shape axis: its bundle holds the one built at the
largest bucket length, every input runs at its own length (longer ones truncated alike), and its single row
(`policy` dynamic) is timed and scored that way. With `bundle.pinned` lengths for its device (engines that run a
static graph faster, `Backend.pins_shapes`), the bundle deploys that artifact compiled at each of them when loaded,
routed like buckets: a `pinned` row, timed and scored interleaved with the `dynamic` row (the same artifact at each
input's own length, `Bundle.load(..., pinned=False)`). With `bundle.precisions` for its device, the same artifact
is also deployed at each engine precision (target `host_<precision>`, the manifest's `engine_options`): rows of
their own, timed and scored like host's, so e.g. OpenVINO's bf16 execution wins only where it is within budget.
On a simulator (QNN HTP on x86-64) the bundle holds the compiled contexts, but nothing is timed (simulator
time is not device latency) and the accuracy comes from the same QDQ graphs on the ONNX Runtime CPU EP,
routed the same way (`accuracy_source` cpu_ep_same_graph).

Reads: the quantize outputs at each bucket length, the compile outputs of this target, the model folder
(its preprocessor), the mix text, the evaluation sets and the reference outputs at the largest bucket.
Writes: `<out>/<target>/` bundles, `<out>/outputs-<target>.npy` (simulated: `outputs-cpu_ep.npy`; pinned: also
`outputs-<target>-free.npy`, the dynamic row's) and `<out>/stage.json` (`rows`: rows of
`metrics/bundles.csv`; `evaluations`: every set's metric of each buckets row).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.backends import get_backend
from tasks.backends.measure import model_files
from tasks.backends.worker import MixTiming, launch_worker
from tasks.core.errors import BackendUnavailableError
from tasks.core.fingerprint import atomic_output_dir, finished_compile, link_or_copy, tool_versions, write_stamp
from tasks.core.machine import host_cpu
from tasks.core.schemas import BUCKETS, DYNAMIC, PINNED, STATIC
from tasks.data import evaluation
from tasks.data.evaluation import EvaluationParams
from tasks.data.text import MixSample, TextSource, mix_sample
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings
from tasks.runtime import mix_worker
from tasks.runtime.bundle import MANIFEST, PREPROCESSOR, Bucket, Manifest

TOOLS = ("onnxruntime", "openvino", "transformers", "numpy")
HOST = "host"
CPU_EP_DEVICE = "ort_cpu"


class BundleParams(MixSample):
    buckets: dict[str, list[int]] = Field(
        {}, description="device -> the seq_lens its bundles route to; a device not named: every seq_len"
    )
    pinned: dict[str, list[int]] = Field(
        {}, description="device -> lengths a dynamic variant's one artifact is compiled at when its bundle loads "
        "(ascending, ending at the largest bucket length); the device's backend must pin shapes (openvino_cpu)"
    )
    precisions: dict[str, list[str]] = Field(
        {}, description="device -> engine precisions a dynamic variant is also deployed at, each a bundle of its own "
        "(compile target host_<precision>) timed and scored beside host's (e.g. openvino_cpu: [bf16] on CPUs with "
        "AMX/avx512_bf16); static variants get theirs from compile.jobs targets"
    )


def precision_target(precision: str) -> str:
    """The target name of a dynamic variant deployed at an engine precision (as compile targets name it)."""
    return f"{HOST}_{precision}"


def compiled_artifacts(compiled: dict[str, dict[int, Path]]) -> tuple[dict[str, dict[int, Path]], list[dict]]:
    """Compile target -> shape -> compiled artifact, for targets compiled at every bucket; the others skipped."""
    ready, skipped = {}, []
    for target, folders in compiled.items():
        artifacts = {}
        for shape, folder in folders.items():
            stamp = finished_compile(folder)
            if stamp["status"] != "compiled":
                skipped.append({"target": target, "seq_len": shape, "status": stamp["status"]})
                break
            artifacts[shape] = Path(folder) / stamp["artifact"]
        else:
            ready[target] = artifacts
    return ready, skipped


def write_bundle(folder: Path, artifacts: dict[int, Path], device: str, target: str, family: str,
                 preprocessor, dynamic: bool = False, pinned: list[int] | None = None,
                 engine_options: dict[str, str] | None = None) -> float:
    """A bundle folder for `artifacts` (shape -> artifact); returns the artifacts' size in MB."""
    buckets, size = [], 0.0
    for shape, artifact in sorted(artifacts.items()):
        files = model_files(Path(artifact))
        for f in files:  # hard links: a bundle repeats artifacts the pipeline already keeps
            link_or_copy(f, folder / f"seq{shape}" / f.name)
        size += sum(f.stat().st_size for f in files) / 1e6
        buckets.append(Bucket(shape=shape, artifact=f"seq{shape}/{Path(artifact).name}"))
    FAMILIES.get(family).save_preprocessor(preprocessor, folder / PREPROCESSOR)
    routing = ({"routing": "one artifact compiled at each pinned length; each input to the smallest that holds it, "
                           "longer inputs truncated to the largest"} if pinned else
               {"routing": "each input at its own length; longer inputs truncated to the maximum"} if dynamic else {})
    manifest = Manifest(family=family, device=device, target=target, buckets=buckets, dynamic=dynamic,
                        pinned=pinned or [], engine_options=engine_options or {}, **routing)
    (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return size


class _Runner:
    """Starts mix workers for one stage in its scratch folder."""

    def __init__(self, tmp: Path, timing: MixTiming):
        self.tmp, self.timing, self.count = tmp, timing, 0

    def run(self, bundle: Path, samples: list, shapes: list, *, timed: bool, outputs: dict[str, Path] | None = None,
            label: str) -> dict:
        self.count += 1
        samples_path = self.tmp / f"samples{self.count}.json"
        samples_path.write_text(json.dumps(samples), encoding="utf-8")
        return launch_worker(
            {"bundle": str(bundle.resolve()), "threads": self.timing.threads, "samples": str(samples_path),
             "shapes": shapes, "warmup_runs": self.timing.warmup_runs, "timed": timed,
             "outputs": {k: str(v) for k, v in (outputs or {}).items()},
             "cache_dir": str(self.tmp / f"engine-cache-{self.count}"), "label": label,
             "result": str(self.tmp / f"result{self.count}.json")},
            self.timing.worker_timeout_s, module=mix_worker.__name__,
        )


def _latency(latencies: list[float]) -> dict:
    lat = np.asarray(latencies)
    return {"latency_mix_mean_ms": float(lat.mean()), "latency_mix_p50_ms": float(np.percentile(lat, 50)),
            "latency_mix_p99_ms": float(np.percentile(lat, 99))}


def run(
    *,
    sources: dict[int, Path],
    compiled: dict[str, dict[int, Path]],
    model_dir: Path,
    text: Path,
    reference_outputs: Path,
    model: str,
    variant: str,
    device: str,
    params: BundleParams,
    text_source: TextSource,
    timing: MixTiming,
    evaluation_params: EvaluationParams,
    family: FamilySettings,
    out_dir: Path,
    key: str,
    eval_limit: int | None = None,
    dynamic: bool = False,
) -> dict:
    """Bundle `sources` (shape -> quantize output), or each compile target's artifacts in `compiled`
    (target -> shape -> compile folder) when this (variant, device) has compile jobs; time and score them.
    `dynamic`: `sources` is the one artifact with a free shape axis (its maximum length -> quantize output)."""
    backend = get_backend(device)
    simulated = bool(getattr(backend, "simulated", False))
    impl = FAMILIES.get(family.name)
    preprocessor = impl.load_preprocessor(Path(model_dir))
    shapes = sorted(sources)
    engine_options: dict[str, dict[str, str]] = {}  # target -> the options its bundle loads with
    if compiled:
        bundles, skipped = compiled_artifacts(compiled)
    else:
        bundles, skipped = {HOST: dict(sources)}, []
        for precision in params.precisions.get(device, []) if dynamic else []:
            bundles[precision_target(precision)] = dict(sources)
            engine_options[precision_target(precision)] = {"inference_precision": precision}
    if bundles and not simulated:
        reason = backend.unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"device {device}: {reason}")
    samples = mix_sample(text_source, Path(text), params.mix_samples, params.seed)
    sets = [evaluation.load(s, impl.class_names(Path(model_dir)), limit=eval_limit) for s in evaluation_params.sets]
    scorer = evaluation.Scorer(sets, np.load(reference_outputs), Path(reference_outputs), evaluation_params.sets)
    cpu_model, cpu_flags = host_cpu()
    common = {"model": model, "variant": variant, "device": device, "threads": timing.threads,
              "simulated": simulated, "cpu_model": cpu_model, "cpu_flags": cpu_flags, "mix_inputs": len(samples)}
    rows, evaluations = [], []
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-bundle-") as tmp_name:
        tmp = Path(tmp_name)
        runner = _Runner(tmp, timing)

        def routed(folder: Path, out_path: Path, label: str, policy: str = mix_worker.BUCKETS) -> tuple[np.ndarray, int]:
            """Every evaluation input through the bundle at `folder` (as it routes, or at each input's own length:
            `mix_worker.FREE`): outputs, and how many it truncated."""
            result = runner.run(folder, scorer.inputs, [policy], timed=False, outputs={policy: out_path},
                                label=f"{label} evaluation sets")
            return np.load(out_path), int(np.sum(result["truncated"]))

        def scored_row(base: dict, policy: str, shapes_label: str, contexts: int, size: float, truncated: int,
                       counts: dict, latency: list | None, scored: tuple[np.ndarray, int], target: str) -> dict:
            """A routed row (buckets, dynamic or pinned) with its accuracy; its scores join `evaluations`."""
            outputs, eval_cut = scored
            source = "cpu_ep_same_graph" if simulated else "artifact"
            scores = scorer.evaluations(outputs, source)
            evaluations.extend({"model": model, "variant": variant, "device": device, "target": target,
                                "policy": policy, **s} for s in scores)
            return {**base, "policy": policy, "shapes": shapes_label, "contexts": contexts, "size_mb": size,
                    "truncated_inputs": truncated, "bucket_counts": json.dumps(counts), "eval_truncated_inputs": eval_cut,
                    **(_latency(latency) if latency else {}), **scorer.columns(outputs, scores), "accuracy_source": source}

        # One bucket routes nothing: its accuracy is the benchmark's at that length; only its mix latency is new.
        # A dynamic artifact runs each input at its own length, which the benchmark's padded feeds do not.
        routing = len(shapes) > 1 or dynamic
        if simulated and bundles:  # accuracy from the same QDQ graphs on the CPU EP, routed the same way: once
            cpu_bundle = tmp / "cpu_ep"
            write_bundle(cpu_bundle, sources, CPU_EP_DEVICE, HOST, family.name, preprocessor)
            label = f"{model} {variant} on the CPU EP"
            cpu_routes = runner.run(cpu_bundle, samples, [mix_worker.BUCKETS], timed=False, label=f"{label} routes")
            cpu_scored = routed(cpu_bundle, scratch / "outputs-cpu_ep.npy", label) if routing else None
        pinned = params.pinned.get(device, []) if dynamic and not simulated else []
        for target, artifacts in bundles.items():
            folder = scratch / target
            size = write_bundle(folder, artifacts, device, target, family.name, preprocessor, dynamic, pinned,
                                engine_options.get(target))
            label = f"{model} {variant} {device} {target}"
            if simulated:
                mix, latencies, scored = cpu_routes, {}, cpu_scored
            else:
                policies = ([mix_worker.BUCKETS, mix_worker.FREE] if pinned else [mix_worker.BUCKETS] if dynamic
                            else [mix_worker.BUCKETS, *shapes] if routing else shapes)
                mix = runner.run(folder, samples, policies, timed=True, label=f"{label} on your inputs")
                latencies = mix["latencies_ms"]
                scored = routed(folder, scratch / f"outputs-{target}.npy", label) if routing else None
            lengths, truncated = np.asarray(mix["lengths"]), np.asarray(mix["truncated"], dtype=bool)
            base = {**common, "target": target, "precision": None if simulated else mix["precision"], "engine_version": mix["engine_version"],
                    "tool_versions": "; ".join(f"{k} {v}" for k, v in sorted(tool_versions(TOOLS).items()))}
            routed_to = np.asarray(mix["bucket_shapes"])
            if pinned:
                rows.append(scored_row(base, PINNED, "/".join(map(str, pinned)), len(pinned), size, int(truncated.sum()),
                                       {str(s): int((routed_to == s).sum()) for s in pinned},
                                       latencies[mix_worker.BUCKETS], scored, target))
                free = routed(folder, scratch / f"outputs-{target}-free.npy", label, mix_worker.FREE)
                rows.append(scored_row(base, DYNAMIC, f"<={shapes[-1]}", 1, size, int(truncated.sum()),
                                       {str(shapes[-1]): int((lengths >= shapes[-1]).sum())},
                                       latencies[mix_worker.FREE], free, target))
            elif scored is not None:
                rows.append(scored_row(base, DYNAMIC if dynamic else BUCKETS,
                                       f"<={shapes[-1]}" if dynamic else "/".join(map(str, shapes)), len(shapes), size,
                                       int(truncated.sum()), {str(s): int((routed_to == s).sum()) for s in shapes},
                                       latencies.get(mix_worker.BUCKETS), scored, target))
            for shape in [] if dynamic else shapes:
                files = model_files(folder / f"seq{shape}" / Path(artifacts[shape]).name)
                rows.append({**base, "policy": STATIC, "shapes": str(shape), "contexts": 1,
                             "size_mb": sum(f.stat().st_size for f in files) / 1e6,
                             "truncated_inputs": int((lengths > shape).sum()),
                             "bucket_counts": json.dumps({str(shape): len(samples)}),
                             **(_latency(latencies[str(shape)]) if latencies else {})})
        payload = {"rows": rows, "evaluations": evaluations, "skipped": skipped, "shapes": shapes}
        write_stamp(scratch, key, payload)
    return payload
