"""Stage compile: one deployable artifact per (variant, device, target, seq_len), checked against its source.

Reads: a quantize output (ONNX QDQ for QNN; ONNX or OpenVINO IR for OpenVINO) and, for the verification
inputs, either `compile.verify_inputs` (an npz of feeds, one row per input) or the fetched HF folder's
tokenizer (`model_dir`, fixed sentences below). A model whose inputs are all float needs neither (seeded noise).
Writes, in `out_dir`: the device artifact (qnn_htp: `model_ctx.onnx` EPContext model + `model_ctx_qnn.bin`
context binary unless embedded; OpenVINO: `model.blob` + its IR and config; ort_cpu: `model_opt.onnx`, the
graph as ONNX Runtime optimizes it, + `ort_config.json`), `placement.json` (nodes per execution
provider/device; CPU-fallback op types and node names) and `stage.json` (status, compile time, exact
tool/SDK versions, options, verification cosines).

The device does the work through its backend's `compile(model, out_dir, options) -> dict` method;
this module resolves the per-device options, gates CPU fallback and verifies the result: the compiled
artifact, run by the backend, must reproduce its source (on the ONNX Runtime CPU EP, or the backend's
own uncompiled path). A device this machine lacks is recorded as `skipped: <reason>`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandera.pandas as pa
from pydantic import BaseModel, ConfigDict, Field

from tasks.catalog import DENSE
from tasks.errors import ConfigError, InputError, StageError
from tasks.fingerprint import atomic_output_dir, tool_versions, write_json_atomic, write_stamp

TOOLS = ("onnx", "onnxruntime", "numpy", "transformers")
PLACEMENT = "placement.json"
CPU_EP = "CPUExecutionProvider"

# Verification sentences (tokenized to the model's static length): short to long, plain to odd.
VERIFY_SENTENCES = (
    "A man is playing a guitar.",
    "A woman is slicing an onion in the kitchen.",
    "Two dogs run across a snowy field toward their owner.",
    "The stock market fell sharply after the announcement of new tariffs on imported steel.",
    "Is the train to Lyon delayed again this morning?",
    "Edge devices run static graphs; every input is padded to the same length before inference.",
    "3 kids, 2 bikes & 1 very patient parent at the park.",
    " ".join(["Long inputs are truncated to the sequence length the model was exported with."] * 12),
    "The cat sleeps.",
    "Researchers measured the latency of the quantized encoder on a mobile neural processor.",
    "A child in a red coat feeds ducks beside the river.",
    "Nobody expected the committee to approve the proposal so quickly.",
)


# One row per compile job and sequence length, as the report stage writes it to metrics/compile.csv.
COMPILE_ROWS = pa.DataFrameSchema(
    {
        "model": pa.Column(str),
        "variant": pa.Column(str),
        "device": pa.Column(str),
        "target": pa.Column(str),
        "seq_len": pa.Column(int, pa.Check.gt(0)),
        "status": pa.Column(str, pa.Check.str_matches(r"^(compiled|skipped: .+)$")),
        "artifact": pa.Column(str, nullable=True),
        "size_mb": pa.Column(float, pa.Check.gt(0), nullable=True),
        "precision": pa.Column(str, nullable=True),
        "npu_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "cpu_fallback_nodes": pa.Column("Int64", pa.Check.ge(0), nullable=True),
        "cpu_fallback_op_types": pa.Column(str, nullable=True),
        "compile_s": pa.Column(float, pa.Check.ge(0), nullable=True),
        "cached_compile_s": pa.Column(float, pa.Check.ge(0), nullable=True),
        "verify_min_cosine": pa.Column(float, pa.Check.in_range(-1.0001, 1.0001), nullable=True),
        "verify_run_ms_median": pa.Column(float, pa.Check.gt(0), nullable=True),
        "simulated": pa.Column(bool),
        "engine_versions": pa.Column(str, nullable=True),
        "dvc_stage": pa.Column(str),
    },
    checks=pa.Check(
        lambda df: ~df.duplicated(["model", "variant", "device", "target", "seq_len"]),
        error="one row per (model, variant, device, target, seq_len)",
    ),
    strict=True,
    coerce=True,
    ordered=True,
    name="compile_rows",
)


def compile_row(payload: dict) -> dict[str, Any]:
    """The COMPILE_ROWS row of one compile stage payload (skipped devices leave measurements empty)."""
    versions = payload.get("versions")
    fallback = payload.get("cpu_fallback_op_types")
    return {
        "model": payload.get("model", DENSE),
        "variant": payload["variant"],
        "device": payload["device"],
        "target": payload["target"],
        "seq_len": payload["seq_len"],
        "status": payload["status"],
        "artifact": payload.get("artifact"),
        "size_mb": payload.get("size_mb"),
        "precision": payload.get("precision"),
        "npu_nodes": payload.get("npu_nodes"),
        "cpu_fallback_nodes": payload.get("cpu_fallback_nodes"),
        "cpu_fallback_op_types": ", ".join(f"{op} x{n}" for op, n in fallback.items()) if fallback is not None else None,
        "compile_s": payload.get("compile_seconds"),
        "cached_compile_s": payload.get("cached_compile_seconds"),
        "verify_min_cosine": payload.get("verify_min_cosine"),
        "verify_run_ms_median": payload.get("verify_run_ms_median"),
        "simulated": bool(payload.get("simulated", False)),
        "engine_versions": ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else None,
        "dvc_stage": payload["dvc_stage"],
    }


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QnnSoc(_Section):
    """One Qualcomm SoC as QNN names it: the `soc_model` and `htp_arch` provider options."""

    chipset: str = Field(description="Qualcomm part number, for the record")
    soc_model: int = Field(gt=0, description="QNN Qnn_SocModel_t value")
    htp_arch: int = Field(ge=68, description="Hexagon HTP architecture (QnnHtpDevice_Arch_t): 68, 69, 73, 75, 79, 81")


# soc_model: Qnn_SocModel_t in the QNN SDK header include/QNN/QnnTypes.h (SM8550 = 43, SM8650 = 57,
#   SC8380XP = 60, SM8750 = 69; e.g. the copy in github.com/chuzcjoe/qnnx). The ONNX Runtime QNN EP
#   docs point to the QAIRT "supported Snapdragon devices" table for the same numbers.
# htp_arch: Qualcomm's SoC table in google-ai-edge/LiteRT litert/vendors/qualcomm/core/schema/soc_table.cc
#   (SM8550 V73, SM8650 V75, SM8750 V79, SC8380XP V73); Olive's QAIRT pass documents the X Elite as
#   'dsp_arch:v73;soc_model:60' (olive/passes/qairt/gen_ai_builder.py).
# Snapdragon X Elite: SC8380XP was renamed X1E80100 (linux-arm-msm, Nov 2023: "refers to the exact same
#   SoC"); QNN keeps the SC8380XP name.
QNN_SOCS: dict[str, QnnSoc] = {
    "snapdragon_8_gen_2": QnnSoc(chipset="SM8550", soc_model=43, htp_arch=73),
    "snapdragon_8_gen_3": QnnSoc(chipset="SM8650", soc_model=57, htp_arch=75),
    "snapdragon_8_elite": QnnSoc(chipset="SM8750", soc_model=69, htp_arch=79),
    "snapdragon_x_elite": QnnSoc(chipset="X1E80100 (SC8380XP)", soc_model=60, htp_arch=73),
}


class DeviceCompileParams(_Section):
    """What every device section shares; each device adds its options and `backend_options`."""

    max_cpu_fallback_nodes: int = Field(
        0, ge=0, description="fail the stage when more source nodes than this run on the CPU EP"
    )

    def backend_options(self, target: str | None, threads: int) -> dict[str, Any]:
        raise NotImplementedError


class QnnHtpCompileParams(DeviceCompileParams):
    targets: dict[str, QnnSoc] = Field(
        default_factory=lambda: dict(QNN_SOCS), description="SoC name -> QNN soc_model/htp_arch"
    )
    embed_context: bool = Field(False, description="context binary inside the ONNX file (one file) or beside it")
    offload_graph_io_quantization: bool = Field(
        False, description="true: graph-input Q / output DQ run on the CPU EP (the EP default); false: in the context"
    )
    enable_htp_fp16_precision: bool = Field(True, description="run fp32 models in fp16 (HTP has no fp32 path)")
    htp_graph_finalization_optimization_mode: Literal[0, 1, 2, 3] = Field(
        3, description="0 default, 1 fastest prepare, 3 slowest prepare / most optimal graph"
    )
    vtcm_mb: int = Field(0, ge=0, description="VTCM size in MB; 0 = the SoC's default")

    def backend_options(self, target: str | None, threads: int) -> dict[str, Any]:
        # The HTP runs the graph itself; host threads only matter for the verification sessions.
        if target not in self.targets:
            raise ConfigError(
                f"compile.qnn_htp: unknown target SoC {target!r}; known: {', '.join(sorted(self.targets))} "
                "(add one under compile.qnn_htp.targets)"
            )
        soc = self.targets[target]
        return {
            "soc_model": soc.soc_model,
            "htp_arch": soc.htp_arch,
            "embed_context": self.embed_context,
            "offload_graph_io_quantization": self.offload_graph_io_quantization,
            "enable_htp_fp16_precision": self.enable_htp_fp16_precision,
            "htp_graph_finalization_optimization_mode": self.htp_graph_finalization_optimization_mode,
            "vtcm_mb": self.vtcm_mb,
        }


class OpenVinoCompileParams(DeviceCompileParams):
    """OpenVINO plugin config for a compiled blob; `target` is only a label for the machine class."""

    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    inference_precision: str | None = Field(
        None, description="INFERENCE_PRECISION_HINT (f32, bf16, f16); null = the device default"
    )
    num_streams: int = Field(1, ge=1, description="CPU only")
    npu_turbo: bool = Field(True, description="NPU only: NPU_TURBO")

    def backend_options(self, target: str | None, threads: int) -> dict[str, Any]:
        options = {"performance_hint": self.performance_hint, "num_streams": self.num_streams,
                   "npu_turbo": self.npu_turbo, "threads": threads}
        if self.inference_precision:
            options["inference_precision"] = self.inference_precision
        return options


class OrtCpuCompileParams(DeviceCompileParams):
    """ONNX Runtime CPU EP: the artifact is the graph as ORT optimizes it, saved once (offline mode)."""

    graph_optimization_level: Literal["disable", "basic", "extended", "layout", "all"] = Field(
        "extended",
        description="extended: fusions into ORT contrib ops, portable to any ORT CPU build; layout/all add "
        "layout transforms ORT ties to this CPU (measured: same graph and speed on MiniLM, README)",
    )

    def backend_options(self, target: str | None, threads: int) -> dict[str, Any]:
        return {"graph_optimization_level": self.graph_optimization_level, "threads": threads}


class CompileJob(_Section):
    """One compiled artifact per sequence length: a quantize variant for a device and target."""

    variant: str
    device: str
    target: str = Field(description="qnn_htp: a SoC under compile.qnn_htp.targets; OpenVINO: a label")


class CompileParams(_Section):
    # At least one: dvc.yaml's report stage depends on the artifacts/compile folder, which must exist.
    jobs: list[CompileJob] = Field(
        default_factory=lambda: [CompileJob(variant="fp32", device="openvino_cpu", target="host")],
        min_length=1,
        description="what is compiled for which device",
    )
    ort_cpu: OrtCpuCompileParams = OrtCpuCompileParams()
    qnn_htp: QnnHtpCompileParams = QnnHtpCompileParams()
    openvino_cpu: OpenVinoCompileParams = OpenVinoCompileParams(inference_precision="f32")
    openvino_npu: OpenVinoCompileParams = OpenVinoCompileParams()
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
    from tasks.backends import get_backend

    try:
        backend = get_backend(device)
    except KeyError as exc:
        raise ConfigError(f"compile: {exc.args[0]}") from None
    if not callable(getattr(backend, "compile", None)):
        raise ConfigError(f"compile: device {device!r} has no compile step; benchmark its ONNX model directly")
    return backend


def tools(device: str) -> tuple[str, ...]:
    """Tools whose versions key this stage: the shared ones plus the device's engine."""
    return (*TOOLS, get_compile_backend(device).engine_package)


def _input_specs(model: Path) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, static shape) of each model input; an .xml is an OpenVINO IR."""
    if model.suffix == ".xml":
        import openvino as ov

        ports = ov.Core().read_model(str(model)).inputs
        raw = [(p.get_any_name(), np.dtype(p.get_element_type().to_dtype()), p.get_partial_shape()) for p in ports]
        specs = [(n, t, tuple(d.get_length() if d.is_static else 0 for d in shape)) for n, t, shape in raw]
    else:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype

        graph = onnx.load(str(model), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        specs = [
            (
                inp.name,
                np.dtype(tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)),
                tuple(d.dim_value for d in inp.type.tensor_type.shape.dim),
            )
            for inp in graph.input
            if inp.name not in inits
        ]
    for name, _, dims in specs:
        if any(d <= 0 for d in dims):
            raise InputError(f"{model}: input {name} has a dynamic shape {dims}; NPUs need static shapes")
    return specs


def verification_feeds(model: Path, params: CompileParams, model_dir: Path | None) -> tuple[str, list[dict]]:
    """`params.verify_count` single-row feeds and where they came from (npz, tokenizer or noise)."""
    specs = _input_specs(model)
    names = [name for name, _, _ in specs]
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
        from transformers import AutoTokenizer

        from tasks.export_onnx import tokenize

        if n > len(VERIFY_SENTENCES):
            raise InputError(
                f"compile.verify_count={n} exceeds the {len(VERIFY_SENTENCES)} built-in sentences; "
                "set compile.verify_inputs"
            )
        seq_len = specs[0][2][-1]
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise InputError(f"{model_dir}: cannot load the tokenizer ({exc.__class__.__name__})") from exc
        arrays = tokenize(tokenizer, VERIFY_SENTENCES[:n], seq_len)
        missing = [k for k in names if k not in arrays]
        if missing:
            raise InputError(f"{model}: inputs {missing} are not tokenizer outputs; set compile.verify_inputs")
        source = f"tokenizer:{len(VERIFY_SENTENCES[:n])} sentences"
    elif all(dtype.kind == "f" for _, dtype, _ in specs):
        rng = np.random.default_rng(0)
        arrays = {name: rng.standard_normal((n, *dims[1:])).astype(dtype) for name, dtype, dims in specs}
        source = "noise:standard normal, seed 0"
    else:
        raise InputError(
            f"{model}: integer inputs need real verification data; pass model_dir (a tokenizer folder) "
            "or set compile.verify_inputs"
        )
    feeds = [{name: np.asarray(arrays[name][i : i + 1]).astype(dtype) for name, dtype, _ in specs} for i in range(n)]
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


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


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
        cosines.append(_cosine(output, reference.run(feed)))
    return cosines, times_ms


def run(
    model: Path,
    device: str,
    target: str | None,
    params: CompileParams,
    out_dir: Path,
    key: str,
    model_dir: Path | None = None,
    record: dict[str, Any] | None = None,
) -> dict:
    """Compile `model` for `device`/`target` into `out_dir`; returns the stage.json payload.

    `model_dir` (optional): the fetched HF folder whose tokenizer builds the verification inputs when
    `params.verify_inputs` is not set. `record`: labels copied into the payload (variant, seq_len).
    A device this machine cannot run is a `skipped: <reason>` status, not an error: the payload says
    why, and a backend that can prepare offline (OpenVINO NPU) leaves its static IR and config.
    """
    model = Path(model)
    backend = get_compile_backend(device)
    device_params = getattr(params, device, None)
    if not isinstance(device_params, DeviceCompileParams):
        raise ConfigError(f"compile: no options section for device {device!r}; add compile.{device}")
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

    feed_source, feeds = verification_feeds(model, params, model_dir)
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
            "npu_nodes": npu_nodes(device, placement),
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


def npu_nodes(device: str, placement: dict) -> int:
    """Source nodes placed on the accelerator (0 for CPU devices)."""
    if device == "qnn_htp":
        return int(placement["nodes_per_ep"].get("QNNExecutionProvider", 0))
    if device.endswith("_npu"):
        return int(sum(n for ep, n in placement["nodes_per_ep"].items() if ep != "CPU"))
    return 0
