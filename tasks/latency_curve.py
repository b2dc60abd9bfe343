"""Stage latency_curve (one per model): latency at sequence lengths beyond the deployed ones, for
choosing a length.

Static shapes force one sequence length per artifact; the seq-len choice (`tasks.seq_len_choice`)
weighs how many inputs a length truncates against what it costs. The deployed lengths (`seq_lens`)
are measured by the benchmark stage; this stage adds `report.latency_curve.seq_lens` (off when
empty: the stage then writes no rows). For each extra length L it builds every variant the benchmark targets use with
the pipeline's own stage functions and settings (export_onnx.run -> graph_surgery.run ->
calibration_data.run at L -> quantize.run) in a scratch folder, then times each target on its device
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

from pydantic import BaseModel, ConfigDict

from tasks import calibration_data, export_onnx, graph_surgery, quantize
from tasks.backends import get_backend
from tasks.calibration_data import CalibrationDataParams
from tasks.config import BenchmarkParams, ExportOnnxParams, Target
from tasks.fingerprint import atomic_output_dir, write_stamp
from tasks.graph_surgery import GraphSurgeryParams
from tasks.quantize import QuantizeParams
from tasks.seq_len_choice import LatencyCurveParams

TOOLS = (*export_onnx.TOOLS, *quantize.TOOLS, "transformers", "numpy")
SCRATCH_KEY = "latency-curve"  # stamps of the scratch outputs, which never outlive this stage


class LatencyCurveSettings(BaseModel):
    """Every params section this stage reads: it rebuilds artifacts exactly as the pipeline does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_curve: LatencyCurveParams
    export_onnx: ExportOnnxParams
    graph_surgery: GraphSurgeryParams
    calibration_data: CalibrationDataParams
    quantize: QuantizeParams
    benchmark: BenchmarkParams
    targets: list[Target]


def timed_targets(targets: list[Target]) -> list[Target]:
    """The targets whose device reports real (not simulated) latency on this machine."""
    return [t for t in targets if not getattr(get_backend(t.device), "simulated", False)]


def build_variants(
    model_dir: Path, sources: list[Path], seq_len: int, variants: list[str], params: LatencyCurveSettings, tmp: Path
) -> dict[str, Path]:
    """Each variant's artifact at `seq_len`, made by the pipeline's own stage functions in `tmp`."""
    export_onnx.run(model_dir, seq_len, params.export_onnx, tmp / "export", key=SCRATCH_KEY)
    exported = tmp / "export" / "model.onnx"
    settings = {v: params.quantize.variant(v) for v in variants}
    surgery = calibration = None
    if any(s.method != "none" for s in settings.values()):
        graph_surgery.run(exported, params.graph_surgery, tmp / "surgery", key=SCRATCH_KEY)
        surgery = tmp / "surgery" / "model.onnx"
    if any(quantize.needs_calibration(s) for s in settings.values()):
        calib = params.calibration_data.model_copy(update={"samples": params.latency_curve.calibration_samples})
        calibration_data.run(model_dir, sources, [seq_len], calib, tmp / "calibration", key=SCRATCH_KEY)
        calibration = tmp / "calibration" / calibration_data.calib_name(seq_len)
    artifacts = {}
    for variant, s in settings.items():
        quantize.run(model=exported if s.method == "none" else surgery, calibration=calibration,
                     variant=variant, params=params.quantize, out_dir=tmp / "quantize" / variant, key=SCRATCH_KEY)
        artifacts[variant] = tmp / "quantize" / variant / quantize.artifact_name(s)
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
    from transformers import AutoTokenizer

    from tasks.benchmark import HOST, WorkerPool, model_files, timing_columns

    bench = params.benchmark
    targets = timed_targets(params.targets)
    variants = list(dict.fromkeys(t.variant for t in targets))
    rows = []
    with atomic_output_dir(out_dir) as scratch:
        for seq_len in params.latency_curve.seq_lens:
            with tempfile.TemporaryDirectory(prefix=f"edgeopt-curve-{seq_len}-") as tmp_name:
                tmp = Path(tmp_name)
                artifacts = build_variants(model_dir, sources, seq_len, variants, params, tmp)
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
                feeds = export_onnx.tokenize(tokenizer, export_onnx.VERIFY_SENTENCES[:1], seq_len)
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
