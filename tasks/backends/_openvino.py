"""Shared OpenVINO plumbing for the CPU and NPU backends: only the device string differs.

`load` reads an ONNX model or an IR (`model.xml` + `model.bin`), pins it to its declared static
shapes, compiles it for latency on exactly one device (never AUTO or HETERO, so a missing device is
an error rather than a silent fallback) and reports the precision the compiled model really runs.
`compile` turns a static model into a deployable `model.blob` (the exported compiled model) plus
the IR and plugin config it came from; `load` imports such a blob with that config.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from tasks.backends.base import DeviceCompileParams
from tasks.core.errors import BackendUnavailableError, ConfigError, InputError, StageError
from tasks.core.feeds import build_feeds
from tasks.core.fingerprint import write_json_atomic
from tasks.core.onnx_graph import port_name

ARTIFACT = "model.blob"
IR_FILE = "model.xml"
CONFIG_FILE = "ov_config.json"
# Compile options (OpenVinoCompileParams.backend_options); the ones that do not apply
# to a device (threads and num_streams on the NPU, npu_turbo on the CPU) are ignored.
OPTIONS = ("performance_hint", "inference_precision", "threads", "num_streams", "npu_turbo")
_LOW_BIT = {"i8": "int8", "u8": "int8", "i4": "int4", "u4": "int4"}


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


def _precision_name(value) -> str:
    """'f32' for ov.Type.f32, 'bf16' for ov.Type.bf16, ... (strings pass through lower-cased)."""
    name = getattr(value, "get_type_name", None)
    return (name() if name else str(value)).lower()


def ov_error(exc: BaseException) -> str:
    """The informative line of an OpenVINO exception (the first lines are C++ source locations)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Exception from ")]
    return (lines[-1] if lines else exc.__class__.__name__)[:300]


def ov_versions() -> dict[str, str]:
    """The OpenVINO build, and NNCF's version when installed (it made the quantized IRs)."""
    import openvino as ov

    versions = {"openvino": ov.get_version()}
    try:
        versions["nncf"] = metadata.version("nncf")
    except metadata.PackageNotFoundError:
        pass
    return versions


def onnx_dynamic_quantization(path: Path) -> int:
    """ORT dynamic-quantization ops in an ONNX file (OpenVINO decomposes them beyond recognition)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(n.op_type in ("DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulInteger") for n in graph.node)


def quantization_summary(model) -> dict[str, int]:
    """How an (uncompiled) ov.Model is quantized: FakeQuantize ops and low-bit weight constants."""
    counts: Counter = Counter()
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            counts["fake_quantize"] += 1
        elif kind == "Constant":
            bits = _LOW_BIT.get(op.get_output_element_type(0).get_type_name())
            if bits:
                counts[f"{bits}_constants"] += 1
        elif kind in ("QuantizeLinear", "DequantizeLinear"):  # not expected after conversion
            counts["qdq"] += 1
    return dict(counts)


# Execution-graph layer types that hold the model's arithmetic (what "int8" or "f32" is about).
_COMPUTE_LAYERS = {"FullyConnected", "MatMul", "Convolution", "ScaledDotProductAttention", "GroupConvolution"}
# Graph bookkeeping rather than operations: not counted as placed nodes.
_RUNTIME_NON_OPS = {"Input", "Output", "Const"}
_SOURCE_NON_OPS = {"Parameter", "Result", "Constant"}


def runtime_layers(compiled) -> Counter:
    """Counter of (runtime precision, kernel) over the compiled model's compute layers.

    The precision is what the plugin stores the layer's weights in (u8 for an int8-weight layer
    even when it decompresses them to f32); the kernel name says what the arithmetic runs in
    (e.g. brgemm_avx2_f32 vs. a *_u8s8 / *_i8 kernel).
    """
    found: Counter = Counter()
    try:
        runtime = compiled.get_runtime_model()
    except RuntimeError:  # some plugins (e.g. NPU) do not expose the execution graph
        return found
    for op in runtime.get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in _COMPUTE_LAYERS:
            prec = info["runtimePrecision"].astype(str).lower() if "runtimePrecision" in info else "?"
            kernel = info["primitiveType"].astype(str).lower() if "primitiveType" in info else "?"
            found[(prec, kernel)] += 1
    return found


def placement(compiled, source, device: str) -> dict[str, Any]:
    """Operations per execution device of a model compiled for `device`, in the shape of QNN's report.

    A model compiled for one named device runs on it whole or does not compile: OpenVINO moves ops
    to another device only under HETERO/AUTO, which these backends never use. So the count is the
    runtime model's operations (the source's when the plugin hides its execution graph), all on
    `device`, and any other device in EXECUTION_DEVICES is a StageError naming it.
    """
    devices = [str(d) for d in compiled.get_property("EXECUTION_DEVICES")]
    foreign = [d for d in devices if d != device]
    if foreign:
        raise StageError(
            f"OpenVINO {device}: the compiled model also runs on {', '.join(foreign)} "
            f"(EXECUTION_DEVICES {devices}); a model compiled for {device} must run on {device} only"
        )
    ops: list[str] = []
    try:
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" in info and info["layerType"].astype(str) not in _RUNTIME_NON_OPS:
                ops.append(info["layerType"].astype(str))
    except RuntimeError:  # e.g. NPU: no execution graph
        pass
    counted_in = "runtime model"
    if not ops:
        ops = [op.get_type_name() for op in source.get_ops() if op.get_type_name() not in _SOURCE_NON_OPS]
        counted_in = "source model"
    return {
        "nodes_total": len(ops),
        "nodes_per_ep": {device: len(ops)},
        "op_types": dict(sorted(Counter(ops).items())),
        "counted_in": counted_in,
        "execution_devices": devices,
        "cpu_fallback": {"count": 0, "op_types": {}, "nodes": []},
    }


def _int8_arithmetic(layers: Counter) -> bool:
    return any(tag in kernel for _, kernel in layers for tag in ("u8", "s8", "i8"))


def describe_precision(hint: str, quant: dict[str, int], layers: Counter) -> str:
    """A short honest label: the float precision, plus int8/int4 parts when the model has them.

    "f32"                float model run in fp32 (or "bf16"/"f16" when the plugin computes in that)
    "int8+f32"           FakeQuantize (PTQ) model whose quantized layers run int8 kernels, rest fp32
    "w8a32" / "w4a32"    weight-only compressed model: low-bit weights decompressed, float arithmetic
    "w8a8dyn+f32"        weight-only model whose activations the plugin quantizes at run time
    "dyn-int8 emulated in f32"  ORT dynamic-quantization model: int8 values, float kernels
    """
    int8 = _int8_arithmetic(layers)
    if quant.get("dynamic_quantize"):  # ORT dynamic model: activations quantized per run by graph ops
        return f"dyn-int8+{hint}" if int8 else f"dyn-int8 emulated in {hint}"
    if quant.get("fake_quantize") or quant.get("qdq"):
        return f"int8+{hint}" if int8 or not layers else f"{hint} (int8 layers not used by the plugin)"
    for bits in ("int4", "int8"):
        if quant.get(f"{bits}_constants"):
            w = "w4" if bits == "int4" else "w8"
            if int8:
                return f"{w}a8dyn+{hint}"
            return f"{w}a{hint[1:]}" if hint[:1] == "f" else f"{w}+{hint}"
    return hint


# OpenVINO element types as the ONNX Runtime type strings `tasks.core.feeds.build_feeds` reads.
_ORT_TYPES = {"i64": "tensor(int64)", "i32": "tensor(int32)", "f32": "tensor(float)", "f16": "tensor(float16)",
              "boolean": "tensor(bool)"}
_FILL_KEY = ("framework", "edgeopt.attention_bias_fill")  # ONNX metadata as OpenVINO keeps it (IR too)


def _mask_fill(model) -> float | None:
    """The attention-bias fill value graph surgery recorded in the model, if any."""
    return float(model.get_rt_info(list(_FILL_KEY)).astype(str)) if model.has_rt_info(list(_FILL_KEY)) else None


@dataclass(frozen=True)
class _InputArg:
    """What build_feeds needs to know about one model input (an onnxruntime NodeArg look-alike)."""

    name: str
    type: str
    shape: list


@dataclass
class OpenVinoModel:
    compiled: object
    request: object
    inputs: dict[str, np.dtype]
    output: object
    precision: str
    device: str
    args: list = field(default_factory=list)
    mask_fill_value: float | None = None
    details: dict = field(default_factory=dict)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        # Casts int64 token arrays to the declared dtypes and builds attention_bias / pooling_mask
        # when graph surgery replaced the mask chain by float inputs.
        tensors = build_feeds(self.args, feed, mask_fill_value=self.mask_fill_value)
        # Shared, not copied: infer is synchronous and the output is copied out before the next call.
        result = self.request.infer({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                    share_inputs=True, share_outputs=True)
        return np.array(result[self.output], copy=True)


class OpenVinoBackend:
    engine_package = "openvino"
    dynamic_shapes = False
    pins_shapes = False
    compile_params: type[OpenVinoCompileParams] = OpenVinoCompileParams

    def __init__(
        self,
        name: str,
        device: str,
        inference_precision: str | None = None,
        cache_dir: Path | None = None,
    ):
        self.name = name
        self.device = device
        self.inference_precision = inference_precision
        """INFERENCE_PRECISION_HINT passed to the plugin; None keeps the device default."""
        self.cache_dir = cache_dir
        """CACHE_DIR for compiled blobs (None: no cache); `load(..., cache_dir=)` overrides it."""

    def unavailable_reason(self) -> str | None:
        try:
            import openvino as ov
        except ImportError as exc:
            return f"openvino not importable: {exc}"
        try:
            devices = ov.Core().available_devices
        except RuntimeError as exc:
            return f"OpenVINO could not list devices: {ov_error(exc)}"
        if self.device not in devices:
            return (
                f"OpenVINO device {self.device} not present (available: {', '.join(devices) or 'none'}); "
                f"install the {self.device} driver or drop {self.name} from devices"
            )
        return None

    def _require_device(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"device {self.name}: {reason}")

    def plugin_config(self, options: dict[str, Any]) -> dict[str, Any]:
        """OpenVINO properties for `options` (keys in OPTIONS) on this device."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"{self.name}: unknown compile options {unknown}; known: {', '.join(OPTIONS)}")
        config: dict[str, Any] = {"PERFORMANCE_HINT": str(options.get("performance_hint", "LATENCY"))}
        if self.device == "CPU":
            if options.get("threads") is not None:
                config["INFERENCE_NUM_THREADS"] = int(options["threads"])
            config["NUM_STREAMS"] = int(options.get("num_streams", 1))
        if self.device == "NPU" and options.get("npu_turbo") is not None:
            config["NPU_TURBO"] = bool(options["npu_turbo"])
        precision = options.get("inference_precision") or self.inference_precision
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        return config

    def read_model(self, artifact: Path, *, require_static: bool | None = None, pin_shape: int | None = None):
        """The model at `artifact` pinned to its static input shapes.

        Dynamic inputs are an InputError when `require_static` (default: on every device but the CPU).
        `pin_shape`: every free dimension set to this length (an edgeopt dynamic export frees only its shape axis).
        """
        import openvino as ov

        artifact = Path(artifact)
        if require_static is None:
            require_static = self.device != "CPU"
        if not artifact.is_file():
            raise InputError(f"{artifact}: model not found")
        if artifact.suffix == ".xml" and not artifact.with_suffix(".bin").is_file():
            raise InputError(f"{artifact}: IR weights {artifact.with_suffix('.bin').name} missing beside it")
        if artifact.suffix not in (".onnx", ".xml"):
            raise InputError(f"{artifact}: OpenVINO backends load .onnx or .xml (IR) files")
        try:
            model = ov.Core().read_model(str(artifact))
        except RuntimeError as exc:
            raise InputError(f"{artifact}: OpenVINO cannot read this model: {ov_error(exc)}") from exc
        static = {}
        for port in model.inputs:
            shape = port.get_partial_shape()
            if shape.is_static:
                static[port_name(port)] = shape
            elif pin_shape is not None:
                static[port_name(port)] = ov.PartialShape([d if d.is_static else pin_shape for d in shape])
            elif require_static:
                raise InputError(
                    f"{artifact}: input {port_name(port)} has dynamic shape {shape}; "
                    f"{self.device} needs a static export (export_onnx writes one per seq_len)"
                )
        if static:
            model.reshape(static)  # pin declared static shapes so the plugin compiles one shape
        return model

    @staticmethod
    def _quantization(artifact: Path, model) -> dict[str, int]:
        quant = quantization_summary(model)
        if Path(artifact).suffix == ".onnx" and (dynamic := onnx_dynamic_quantization(Path(artifact))):
            quant["dynamic_quantize"] = dynamic
        return quant

    def _wrap(self, compiled, quant: dict[str, int], fill: float | None) -> OpenVinoModel:
        """An OpenVinoModel for a compiled (or imported) model, its precision read back from the plugin."""
        hint = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        layers = runtime_layers(compiled)
        inputs, args = {}, []
        for port in compiled.inputs:
            et = port.get_element_type()
            inputs[port_name(port)] = np.dtype(et.to_dtype())
            shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
            args.append(_InputArg(port_name(port), _ORT_TYPES.get(et.get_type_name(), et.get_type_name()), shape))
        outputs = list(compiled.outputs)  # the export has exactly one output
        details = {
            "inference_precision_hint": hint,
            "quantization": quant,
            "runtime_layers": {f"{prec}/{kernel}": n for (prec, kernel), n in sorted(layers.items())},
            "execution_devices": list(compiled.get_property("EXECUTION_DEVICES")),
        }
        if self.device == "CPU":
            details["inference_num_threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        return OpenVinoModel(
            compiled=compiled,
            request=compiled.create_infer_request(),
            inputs=inputs,
            output=outputs[0],
            precision=describe_precision(hint, quant, layers),
            device=self.device,
            args=args,
            mask_fill_value=fill,
            details=details,
        )

    def load(
        self,
        artifact: Path,
        threads: int,
        *,
        cache_dir: Path | None = None,
        inference_precision: str | None = None,
        pin_shape: int | None = None,
    ) -> OpenVinoModel:
        """Compile an .onnx / IR .xml for this device, or import a `model.blob` written by `compile`.

        A blob is imported with the plugin config saved beside it (ov_config.json), except that
        `threads` replaces its thread count; `cache_dir`, `inference_precision` and `pin_shape` (a free-axis
        model compiled at that one length, `read_model`) only apply to uncompiled models (a blob's precision
        and shapes were fixed when it was compiled).
        """
        import openvino as ov

        self._require_device()
        artifact = Path(artifact)
        if artifact.suffix == ".blob":
            if pin_shape is not None:
                raise InputError(f"{artifact}: a compiled blob has fixed shapes; pin_shape applies to .onnx / .xml")
            return self._import_blob(artifact, threads)
        if pin_shape is not None and not self.pins_shapes:
            raise InputError(f"{self.name} does not pin shapes (bundle.pinned); drop {self.name} from bundle.pinned")
        model = self.read_model(artifact, pin_shape=pin_shape)
        config = self.plugin_config({"threads": threads, "inference_precision": inference_precision})
        cache = cache_dir or self.cache_dir
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache)
        try:
            compiled = ov.Core().compile_model(model, self.device, config)
        except RuntimeError as exc:
            raise BackendUnavailableError(
                f"device {self.name}: compiling {artifact.name} failed: {ov_error(exc)}"
            ) from exc
        return self._wrap(compiled, self._quantization(artifact, model), _mask_fill(model))

    def load_reference(self, source: Path, threads: int) -> OpenVinoModel:
        """The uncompiled source of a blob, compiled here for the same device at the backend's precision:
        what the compile stage checks the blob against (an NNCF IR is not a file ONNX Runtime reads)."""
        return self.load(source, threads)

    def _import_blob(self, artifact: Path, threads: int) -> OpenVinoModel:
        import openvino as ov

        saved_path = artifact.with_name(CONFIG_FILE)
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
            device, config = saved["device"], dict(saved["config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{artifact}: cannot read its plugin config {saved_path.name} ({exc.__class__.__name__}); "
                "recompile it with the compile stage"
            ) from exc
        if device != self.device:
            raise InputError(f"{artifact}: compiled for OpenVINO {device}, not {self.device}")
        if self.device == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            compiled = ov.Core().import_model(artifact.read_bytes(), self.device, config)
        except RuntimeError as exc:
            raise InputError(
                f"{artifact}: OpenVINO {self.device} cannot import this blob ({ov_error(exc)}); it is corrupt "
                f"or from another OpenVINO build than {ov.get_version()}: recompile it"
            ) from exc
        return self._wrap(compiled, saved.get("quantization", {}), saved.get("mask_fill_value"))

    def _timed_compile(self, ir: Path, config: dict[str, Any], label: str):
        """(compiled model, seconds) for compiling the IR file `ir` in a fresh Core, as a new process would."""
        import openvino as ov

        core = ov.Core()
        core.get_versions(self.device)  # load the plugin library before the clock starts
        start = time.perf_counter()
        try:
            compiled = core.compile_model(str(ir), self.device, config)
        except RuntimeError as exc:
            raise StageError(f"{self.name}: compiling {label} for {self.device} failed: {ov_error(exc)}") from exc
        return compiled, time.perf_counter() - start

    def compile(self, model: Path, out_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Compile `model` (.onnx or IR .xml, static shapes) into `out_dir`.

        Writes model.blob (the exported compiled model: the artifact), model.xml/.bin (the static IR
        it was compiled from, weights kept in fp32) and ov_config.json (the plugin config, plus the
        quantization summary and mask fill value `load` needs, since a blob keeps neither).
        Compiles twice with one CACHE_DIR: compile_seconds is the cold compile, cached_compile_seconds
        the warm one (None when the plugin wrote no cache). Returns artifact, files, placement,
        compile_seconds, cached_compile_seconds, options (the plugin config), versions and precision.
        """
        import openvino as ov

        self._require_device()
        model, out_dir = Path(model), Path(out_dir)
        config = self.plugin_config(options)
        source = self.read_model(model, require_static=True)
        quant, fill = self._quantization(model, source), _mask_fill(source)
        out_dir.mkdir(parents=True, exist_ok=True)
        ir = out_dir / IR_FILE
        ov.save_model(source, str(ir), compress_to_fp16=False)

        # The cache stays outside out_dir: it is specific to this machine's CPU and duplicates the blob.
        with tempfile.TemporaryDirectory(prefix="ov-cache-") as cache:
            cached_config = {**config, "CACHE_DIR": cache}
            compiled, cold = self._timed_compile(ir, cached_config, model.name)
            # Export the cold compile: in openvino 2026.4 a model loaded from the cache exports a blob
            # that import_model rejects.
            blob = compiled.export_model()
            warm = self._timed_compile(ir, cached_config, model.name)[1] if any(Path(cache).iterdir()) else None
        (out_dir / ARTIFACT).write_bytes(blob.getvalue() if isinstance(blob, io.BytesIO) else bytes(blob))

        precision = describe_precision(
            _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT")), quant, runtime_layers(compiled)
        )
        write_json_atomic(
            out_dir / CONFIG_FILE,
            {
                "device": self.device,
                "config": config,
                "precision": precision,
                "quantization": quant,
                "mask_fill_value": fill,
                "how_to_import": (
                    "import json, openvino as ov; c = json.load(open('ov_config.json')); "
                    "m = ov.Core().import_model(open('model.blob', 'rb').read(), c['device'], c['config'])"
                ),
            },
        )
        return {
            "artifact": ARTIFACT,
            "files": [ARTIFACT, IR_FILE, ir.with_suffix(".bin").name, CONFIG_FILE],
            "placement": placement(compiled, source, self.device),
            "compile_seconds": cold,
            "cached_compile_seconds": warm,
            "options": config,
            "versions": ov_versions(),
            "precision": precision,
        }
