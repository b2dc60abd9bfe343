"""Shared OpenVINO plumbing for the CPU and NPU backends: only the device string differs.

`load` reads an ONNX model or an IR (`model.xml` + `model.bin`), pins it to its declared static
shapes, compiles it for latency on exactly one device (never AUTO, so a missing device is an error
rather than a silent fallback) and reports the precision the compiled model really runs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.errors import BackendUnavailableError, InputError

OUTPUT_NAME = "embedding"
_LOW_BIT = {"i8": "int8", "u8": "int8", "i4": "int4", "u4": "int4"}


def _precision_name(value) -> str:
    """'f32' for ov.Type.f32, 'bf16' for ov.Type.bf16, ... (strings pass through lower-cased)."""
    name = getattr(value, "get_type_name", None)
    return (name() if name else str(value)).lower()


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


# OpenVINO element types as the ONNX Runtime type strings `tasks.graph_surgery.build_feeds` reads.
_ORT_TYPES = {"i64": "tensor(int64)", "i32": "tensor(int32)", "f32": "tensor(float)", "f16": "tensor(float16)",
              "boolean": "tensor(bool)"}
_FILL_KEY = ("framework", "edgeopt.attention_bias_fill")  # ONNX metadata as OpenVINO keeps it (IR too)


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
        from tasks.graph_surgery import build_feeds

        # Casts int64 token arrays to the declared dtypes and builds attention_bias / pooling_mask
        # when graph surgery replaced the mask chain by float inputs.
        tensors = build_feeds(self.args, feed, mask_fill_value=self.mask_fill_value)
        result = self.request.infer({k: np.ascontiguousarray(v) for k, v in tensors.items()})
        return np.array(result[self.output], copy=True)


class OpenVinoBackend:
    engine_package = "openvino"

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
            return f"OpenVINO could not list devices: {str(exc).splitlines()[0][:200]}"
        if self.device not in devices:
            return (
                f"OpenVINO device {self.device} not present (available: {', '.join(devices) or 'none'}); "
                f"install the {self.device} driver or drop {self.name} from devices"
            )
        return None

    def read_model(self, artifact: Path):
        import openvino as ov

        artifact = Path(artifact)
        if not artifact.is_file():
            raise InputError(f"{artifact}: model not found")
        if artifact.suffix == ".xml" and not artifact.with_suffix(".bin").is_file():
            raise InputError(f"{artifact}: IR weights {artifact.with_suffix('.bin').name} missing beside it")
        if artifact.suffix not in (".onnx", ".xml"):
            raise InputError(f"{artifact}: OpenVINO backends load .onnx or .xml (IR) files")
        model = ov.Core().read_model(str(artifact))
        static = {}
        for port in model.inputs:
            shape = port.get_partial_shape()
            if shape.is_static:
                static[port.get_any_name()] = shape
            elif self.device != "CPU":
                raise InputError(
                    f"{artifact}: input {port.get_any_name()} has dynamic shape {shape}; "
                    f"{self.device} needs a static export (export_onnx writes one per seq_len)"
                )
        if static:
            model.reshape(static)  # pin declared static shapes so the plugin compiles one shape
        return model

    def load(
        self,
        artifact: Path,
        threads: int,
        *,
        cache_dir: Path | None = None,
        inference_precision: str | None = None,
    ) -> OpenVinoModel:
        import openvino as ov

        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"device {self.name}: {reason}")
        model = self.read_model(artifact)
        quant = quantization_summary(model)
        if Path(artifact).suffix == ".onnx" and (dynamic := onnx_dynamic_quantization(Path(artifact))):
            quant["dynamic_quantize"] = dynamic
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if self.device == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
            config["NUM_STREAMS"] = 1
        precision = inference_precision or self.inference_precision
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        cache = cache_dir or self.cache_dir
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache)
        core = ov.Core()
        try:
            compiled = core.compile_model(model, self.device, config)
        except RuntimeError as exc:
            raise BackendUnavailableError(
                f"device {self.name}: compiling {Path(artifact).name} failed: {str(exc).strip().splitlines()[0][:300]}"
            ) from exc
        hint = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        layers = runtime_layers(compiled)
        inputs, args = {}, []
        for port in compiled.inputs:
            et = port.get_element_type()
            inputs[port.get_any_name()] = np.dtype(et.to_dtype())
            shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
            args.append(_InputArg(port.get_any_name(), _ORT_TYPES.get(et.get_type_name(), et.get_type_name()), shape))
        fill = None
        if model.has_rt_info(list(_FILL_KEY)):
            fill = float(model.get_rt_info(list(_FILL_KEY)).astype(str))
        outputs = [p for p in compiled.outputs if OUTPUT_NAME in p.get_names()] or list(compiled.outputs)
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
