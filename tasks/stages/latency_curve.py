"""Stage latency_curve (one per model): latency at sequence lengths beyond the deployed ones, for
choosing a length.

Static shapes force one sequence length per artifact; the seq-len choice (the report stage)
weighs how many inputs a length truncates against what it costs. The deployed lengths (`seq_lens`)
are measured by the benchmark stage; this stage adds `latency_curve.seq_lens` (off when
empty: the stage then writes no rows). For each extra length L it builds every variant the benchmark targets use with
the pipeline's own build functions and settings (`tasks.builders`: export -> graph surgery -> calibration at L
-> quantize) in a scratch folder, then times each target on its device
with the benchmark's worker, threads, warm-up, timed runs and repeats. Latency only: accuracy is
measured at the deployed lengths. Calibration uses `calibration_samples` rows (latency does not
depend on how well activation ranges fit). Targets on a simulator (QNN HTP on x86-64) are skipped:
simulator time is not device latency. A target with compile jobs is timed as its quantize output on
the same device (an OpenVINO blob runs the same plugin kernels as the IR it was compiled from).

Reads: the model's HF folder and the calibration sources. Writes: `<out>/stage.json` whose `rows`
are (model, variant, device, seq_len) latency rows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import Field, SerializeAsAny, field_validator

from tasks.backends import get_backend
from tasks.backends.measure import TimingParams, WorkerPool, model_files, timing_columns
from tasks.builders import calibration, export, quantize, surgery
from tasks.core.fingerprint import atomic_output_dir, write_stamp
from tasks.core.params import StrictParams
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings

TOOLS = (*export.TOOLS, "onnx", "onnxruntime", "openvino", "nncf", "transformers", "numpy")
HOST = "host"
"""`target` of a row timing a quantize output as it is."""


class LatencyCurveParams(StrictParams):
    seq_lens: list[int] = Field(
        [], description="extra lengths timed for the seq-len choice (e.g. [64, 256, 384]); [] = off"
    )
    calibration_samples: int = Field(32, ge=1, description="calibration rows per extra length (latency only)")

    @field_validator("seq_lens")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if s <= 2 or s > 8192]
        if bad:
            raise ValueError(f"latency curve lengths must be between 3 and 8192, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate lengths in {v}")
        return v


class Target(StrictParams):
    """One benchmarked pair: a model variant on a device."""

    variant: str
    device: str


class LatencyCurveSettings(StrictParams):
    """Every params section this stage reads: it rebuilds artifacts exactly as the pipeline does."""

    latency_curve: LatencyCurveParams
    export_onnx: export.ExportOnnxParams
    graph_surgery: surgery.GraphSurgeryParams
    calibration_data: calibration.CalibrationDataParams
    quantize: quantize.QuantizeParams
    timing: TimingParams
    family: SerializeAsAny[FamilySettings]
    targets: list[Target]


def timed_targets(targets: list[Target]) -> list[Target]:
    """The targets whose device reports real (not simulated) latency on this machine."""
    return [t for t in targets if not getattr(get_backend(t.device), "simulated", False)]


def build_variants(
    model_dir: Path, sources: list[Path], seq_len: int, variants: list[str], params: LatencyCurveSettings, tmp: Path
) -> dict[str, Path]:
    """Each variant's artifact at `seq_len`, made by the pipeline's own build functions in `tmp`."""
    family = params.family
    exported = tmp / "export.onnx"
    export.export(model_dir, seq_len, params.export_onnx, family, exported)
    settings = {v: params.quantize.variant(v) for v in variants}
    surgered = calib_npz = None
    if any(s.method != "none" for s in settings.values()):
        surgered = tmp / "surgery.onnx"
        surgery.rewrite(exported, params.graph_surgery, family, surgered, tmp)
    if any(quantize.needs_calibration(s) for s in settings.values()):
        calib = params.calibration_data.model_copy(update={"samples": params.latency_curve.calibration_samples})
        made = calibration.make(model_dir, sources, [seq_len], calib, family, evaluation=None)
        calib_npz = tmp / calibration.calib_name(seq_len)
        calibration.save_npz(calib_npz, made.arrays[seq_len])
    artifacts = {}
    for variant, s in settings.items():
        folder = tmp / "quantize" / variant
        folder.mkdir(parents=True)
        quantize.quantize(exported if s.method == "none" else surgered, calib_npz, variant, params.quantize, family,
                          folder, tmp)
        artifacts[variant] = folder / quantize.artifact_name(s)
    return artifacts


def run(
    *,
    model_dir: Path,
    sources: list[Path],
    model: str,
    params: LatencyCurveSettings,
    out_dir: Path,
    key: str,
) -> dict:
    """Time every non-simulated target at each of `params.latency_curve.seq_lens` (none: no rows)."""
    bench = params.timing
    impl = FAMILIES.get(params.family.name)
    targets = timed_targets(params.targets)
    variants = list(dict.fromkeys(t.variant for t in targets))
    rows = []
    with atomic_output_dir(out_dir) as scratch:
        for seq_len in params.latency_curve.seq_lens:
            with tempfile.TemporaryDirectory(prefix=f"edgeopt-curve-{seq_len}-") as tmp_name:
                tmp = Path(tmp_name)
                artifacts = build_variants(model_dir, sources, seq_len, variants, params, tmp)
                preprocessor = impl.load_preprocessor(Path(model_dir))
                feeds = impl.samples(preprocessor, list(impl.verify_samples()[:1]), seq_len)
                workers = WorkerPool(tmp, feeds, bench.threads, bench.worker_timeout_s)
                for target in targets:
                    cache = tmp / f"engine-cache-{target.variant}-{target.device}"
                    repeats = [
                        workers.run(target.device, artifacts[target.variant], warmup=bench.warmup_runs,
                                    timed=bench.timed_runs, cache_dir=cache,
                                    label=f"{target.variant} {target.device} L={seq_len} (latency curve) "
                                          f"repeat {i + 1}/{bench.repeats}")
                        for i in range(bench.repeats)
                    ]
                    files = model_files(artifacts[target.variant])
                    rows.append({"model": model, "variant": target.variant, "device": target.device, "target": HOST,
                                 "seq_len": seq_len, "threads": bench.threads, "measured_by": "latency_curve",
                                 "size_mb": sum(f.stat().st_size for f in files) / 1e6,
                                 **timing_columns(repeats, bench.p50_spread_tolerance_pct)})
        payload = {"rows": rows, "skipped_simulated": [t.model_dump() for t in params.targets if t not in targets]}
        write_stamp(scratch, key, payload)
    return payload
