"""Stage compile: one deployable artifact per (variant, device, target, seq_len), checked against its source.

Reads: a quantize output (ONNX QDQ for QNN; ONNX or OpenVINO IR for OpenVINO) and, for the verification
inputs, either `compile.verify_inputs` (an npz of feeds, one row per input) or the model folder's
preprocessor (`model_dir`, the family's fixed check samples). A model whose inputs are all float needs
neither (seeded noise).
Writes, in `out_dir`: the device artifact (qnn_htp: `model_ctx.onnx` EPContext model + `model_ctx_qnn.bin`
context binary unless embedded; OpenVINO: `model.blob` + its IR and config; ort_cpu: `model_opt.onnx`, the
graph as ONNX Runtime optimizes it, + `ort_config.json`), `placement.json` (nodes per execution
provider/device; CPU-fallback op types and node names) and `stage.json` (status, compile time, exact
tool/SDK versions, options, verification cosines).

The device does the work through its backend's `compile(model, out_dir, options) -> dict` method, with
the options of its own `compile.<device>` section (the backend's `compile_params`); this module gates CPU
fallback and verifies the result: the compiled
artifact, run by the backend, must reproduce its source (on the ONNX Runtime CPU EP, or the backend's
own uncompiled path). A device this machine lacks is recorded as `skipped: <reason>`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from tasks.backends import get_backend
from tasks.backends.base import DeviceCompileParams
from tasks.core.errors import ConfigError, InputError, StageError
from tasks.core.feeds import build_feeds
from tasks.core.fingerprint import atomic_output_dir, tool_versions, write_json_atomic, write_stamp
from tasks.core.onnx_graph import cosine, input_specs
from tasks.core.params import StrictParams
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings

TOOLS = ("onnx", "onnxruntime", "numpy", "transformers")
PLACEMENT = "placement.json"
CPU_EP = "CPUExecutionProvider"


class CompileCheckParams(StrictParams):
    """The `compile` settings every device shares: how a compiled artifact is checked against its source."""

    verify_inputs: Path | None = Field(
        None, description="npz of verification feeds (arrays named like the model inputs, one row each)"
    )
    verify_count: int = Field(8, ge=8, description="inputs the compiled artifact must reproduce")
    verify_min_cosine: float = Field(0.999, gt=0, le=1, description="per input, compiled vs source on the CPU EP")
    threads: int = Field(
        2, ge=1, le=256, description="threads for the verification sessions (ort_cpu: recorded with the artifact)"
    )


def get_compile_backend(device: str):
    """The device's backend, which must offer `compile`."""
    backend = get_backend(device)
    if backend.compile_params is None or not callable(getattr(backend, "compile", None)):
        raise ConfigError(f"compile: device {device!r} has no compile step; benchmark its ONNX model directly")
    return backend


def tools(device: str) -> tuple[str, ...]:
    """Tools whose versions key this stage: the shared ones plus the device's engine."""
    return (*TOOLS, get_compile_backend(device).engine_package)


def verification_feeds(model: Path, params: CompileCheckParams, family: FamilySettings,
                       model_dir: Path | None) -> tuple[str, list[dict]]:
    """`params.verify_count` single-row feeds and where they came from (npz, the family's samples or noise)."""
    specs = input_specs(model)[0]
    for spec in specs:
        if not spec.static:
            raise InputError(f"{model}: input {spec.name} has a dynamic shape {list(spec.shape)}; NPUs need static shapes")
    names = [spec.name for spec in specs]
    n = params.verify_count
    if params.verify_inputs is not None:
        path = Path(params.verify_inputs)
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise InputError(f"compile.verify_inputs: cannot read {path} ({exc.__class__.__name__})") from exc
        missing = [k for k in names if k not in arrays]
        if missing:
            raise InputError(f"compile.verify_inputs: {path} lacks inputs {missing} (has {sorted(arrays)})")
        rows = min(len(arrays[k]) for k in names)
        if rows < n:
            raise InputError(f"compile.verify_inputs: {path} has {rows} rows, verify_count needs {n}")
        source = f"npz:{path.name}"
    elif model_dir is not None:
        impl = FAMILIES.get(family.name)
        texts = impl.verify_samples()
        if n > len(texts):
            raise InputError(
                f"compile.verify_count={n} exceeds the family's {len(texts)} check samples; set compile.verify_inputs"
            )
        arrays = impl.samples(impl.load_preprocessor(Path(model_dir)), list(texts[:n]), specs[0].shape[-1])
        if model.suffix == ".onnx":  # graph surgery may have replaced the mask by float inputs (metadata has the fill)
            arrays = build_feeds(model, arrays)
        missing = [k for k in names if k not in arrays]
        if missing:
            raise InputError(f"{model}: inputs {missing} are not the family's sample arrays; set compile.verify_inputs")
        source = f"{family.name}:{n} check samples"
    elif all(np.dtype(spec.dtype).kind == "f" for spec in specs):
        rng = np.random.default_rng(0)
        arrays = {spec.name: rng.standard_normal((n, *spec.shape[1:])).astype(spec.dtype) for spec in specs}
        source = "noise:standard normal, seed 0"
    else:
        raise InputError(
            f"{model}: integer inputs need real verification data; pass model_dir (a model folder) "
            "or set compile.verify_inputs"
        )
    feeds = [{s.name: np.asarray(arrays[s.name][i : i + 1]).astype(s.dtype) for s in specs} for i in range(n)]
    return source, feeds


def check_fallback(placement: dict, limit: int, where: str) -> None:
    """StageError naming the op types and nodes left on the CPU EP when there are more than `limit`."""
    fallback = placement["cpu_fallback"]
    if fallback["count"] <= limit:
        return
    ops = ", ".join(f"{op} x{k}" for op, k in fallback["op_types"].items())
    names = [node["name"] for node in fallback["nodes"]]
    shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
    if set(fallback["op_types"]) <= {"QuantizeLinear", "DequantizeLinear"}:
        fix = "keep graph I/O (de)quantization on the device (offload_graph_io_quantization: false)"
    else:
        fix = "rewrite or re-export those ops"
    raise StageError(
        f"{where}: {fallback['count']} node(s) fall back to the CPU (max_cpu_fallback_nodes={limit}): "
        f"op types {ops}; nodes {shown}. Fix: {fix}, or raise max_cpu_fallback_nodes"
    )


class _OrtCpuReference:
    """The source model on the ONNX Runtime CPU EP: what a compiled ONNX artifact must reproduce."""

    def __init__(self, source: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(source), options, providers=[CPU_EP])
        self.output = self.session.get_outputs()[0].name

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feed)[0]


def verify(backend, artifact: Path, source: Path, feeds: list[dict], threads: int) -> tuple[list[float], list[float]]:
    """Per-feed cosine between the compiled artifact (on the device backend) and its source, and the
    compiled artifact's per-feed run time in ms. The source runs on the ONNX Runtime CPU EP, or on the
    backend's own uncompiled path when it offers one (an OpenVINO IR is not an ONNX file)."""
    load_reference = getattr(backend, "load_reference", None)
    reference = load_reference(source, threads) if load_reference else _OrtCpuReference(source, threads)
    compiled = backend.load(artifact, threads)
    cosines, times_ms = [], []
    for feed in feeds:
        start = time.perf_counter()
        output = compiled.run(feed)
        times_ms.append((time.perf_counter() - start) * 1e3)
        cosines.append(cosine(output, reference.run(feed)))
    return cosines, times_ms


def run(
    model: Path,
    device: str,
    target: str | None,
    params: CompileCheckParams,
    device_params: DeviceCompileParams,
    family: FamilySettings,
    out_dir: Path,
    key: str,
    model_dir: Path | None = None,
    record: dict[str, Any] | None = None,
) -> dict:
    """Compile `model` for `device`/`target` into `out_dir`; returns the stage.json payload.

    `device_params`: the device's `compile.<device>` section. `model_dir` (optional): the model folder whose
    preprocessor builds the verification inputs when `params.verify_inputs` is not set. `record`: labels
    copied into the payload (model, variant, seq_len). A device this machine cannot run is a
    `skipped: <reason>` status, not an error: the payload says why, and a backend that can prepare offline
    (OpenVINO NPU) leaves its static IR and config.
    """
    model = Path(model)
    backend = get_compile_backend(device)
    if not isinstance(device_params, backend.compile_params):
        raise ConfigError(f"compile: the options for {device!r} are not a {backend.compile_params.__name__}")
    options = device_params.backend_options(target, params.threads)
    if not model.is_file():
        raise InputError(f"{model}: model not found; run the stage that writes it first")
    where = f"compile {device}" + (f"/{target}" if target else "")
    labels = {**(record or {}), "device": device, "target": target}

    reason = backend.unavailable_reason()
    if reason:
        with atomic_output_dir(out_dir) as scratch:
            offline = getattr(backend, "offline_bundle", None)
            bundle = offline(model, scratch, options) if offline else {"files": [], "options": options}
            payload = {**labels, "status": f"skipped: {reason}", "artifact": None,
                       "artifact_files": bundle["files"], "options": bundle["options"],
                       "versions": bundle.get("versions") or tool_versions([backend.engine_package]),
                       "simulated": bool(getattr(backend, "simulated", False))}
            write_stamp(scratch, key, payload)
        return payload

    feed_source, feeds = verification_feeds(model, params, family, model_dir)
    with atomic_output_dir(out_dir) as scratch:
        result = backend.compile(model, scratch, options)
        placement = result["placement"]
        write_json_atomic(scratch / PLACEMENT, placement)
        check_fallback(placement, device_params.max_cpu_fallback_nodes, where)

        cosines, times_ms = verify(backend, scratch / result["artifact"], model, feeds, params.threads)
        worst = min(cosines)
        if worst < params.verify_min_cosine:
            raise StageError(
                f"{where}: the compiled artifact disagrees with its source (cosine {worst:.6f} < "
                f"{params.verify_min_cosine} on input {cosines.index(worst)} of {len(cosines)}); check the "
                "quantization (e.g. attention-mask fill values) or compile with enable_htp_fp16_precision"
            )
        simulated = bool(getattr(backend, "simulated", False))
        payload = {
            **labels,
            "status": "compiled",
            "artifact": result["artifact"],
            "artifact_files": result["files"],  # "files" is the stamp's own list (every output file)
            "size_mb": sum((scratch / f).stat().st_size for f in result["files"]) / 1e6,
            "precision": result.get("precision"),
            "simulated": simulated,
            "compile_seconds": result["compile_seconds"],
            "cached_compile_seconds": result.get("cached_compile_seconds"),
            "options": result["options"],
            "versions": result["versions"],
            "nodes_per_ep": placement["nodes_per_ep"],
            "npu_nodes": backend.accelerator_nodes(placement),
            "cpu_fallback_nodes": placement["cpu_fallback"]["count"],
            "cpu_fallback_op_types": placement["cpu_fallback"]["op_types"],
            "verify_source": feed_source,
            "verify_cosines": cosines,
            "verify_min_cosine": worst,
            # Per-input run time of the compiled artifact while verifying. On a simulator these are
            # simulator timings, never device latency: `simulated` says which.
            "verify_run_ms_median": float(np.median(times_ms)),
        }
        write_stamp(scratch, key, payload)
    return payload
