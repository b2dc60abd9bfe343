"""Stage quantize: one quantized artifact per named variant of one ONNX model.

Reads: an ONNX model (static shapes, usually the graph-surgery output) and, for the calibrated
methods, a calibration npz (int64 `input_ids`/`attention_mask`/`token_type_ids`, [N, seq_len]).
Writes: `<out>/model.onnx` (ONNX Runtime methods) or `<out>/model.xml` + `model.bin` (NNCF methods)
and `<out>/stage.json` with what was done: settings, size, time, and how many quantize nodes the
artifact holds, so a variant that silently quantized nothing is visible.

Variants are data: `QuantizeParams.variants` maps a name to settings discriminated by `method`:
  ort_static    onnxruntime.quantization.quantize_static, QDQ format (e.g. ort_qdq_a8w8)
  ort_qnn       ONNX Runtime's QNN recipe, get_qnn_qdq_config + quantize (e.g. ort_qdq_a16w8)
  ort_dynamic   quantize_dynamic: int8 weights, activations quantized at run time
  nncf_ptq      NNCF post-training quantization of the OpenVINO model (FakeQuantize in the IR)
  nncf_weights  NNCF weight-only compression (int8 / int4 weights, float activations)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.errors import InputError, StageError
from tasks.fingerprint import atomic_output_dir, tool_versions, write_stamp

TOOLS = ("onnx", "onnxruntime", "openvino", "nncf")
ONNX_ARTIFACT = "model.onnx"
IR_ARTIFACT = "model.xml"

CalibrateMethod = Literal["MinMax", "Entropy", "Percentile"]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrtStaticSettings(_Settings):
    """Static QDQ quantization with ONNX Runtime (activations and weights both quantized)."""

    method: Literal["ort_static"] = "ort_static"
    activation_type: Literal["uint8", "int8", "uint16", "int16"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = Field(True, description="one scale per output channel of each weight")
    reduce_range: bool = Field(False, description="7-bit weights (avoids u8s8 overflow on CPUs without VNNI)")
    activation_symmetric: bool = False
    calibrate_method: CalibrateMethod = "MinMax"
    percentile: float = Field(99.999, gt=90, le=100, description="for calibrate_method: Percentile")
    calibration_rows: int | None = Field(None, ge=1, description="first N rows of the npz; null = all")
    op_types: list[str] | None = Field(None, description="op types to quantize; null = every supported op")
    nodes_to_exclude: list[str] = Field([], description="node names (of the pre-processed graph) kept in float")
    tensor_overrides: dict[str, dict[str, str | float | int | bool]] = Field(
        {}, description="ORT TensorQuantOverrides per tensor: quant_type (e.g. uint16), rmin/rmax, symmetric"
    )


class OrtQnnSettings(_Settings):
    """ONNX Runtime's QDQ recipe for the QNN execution provider (16-bit activations by default)."""

    method: Literal["ort_qnn"] = "ort_qnn"
    activation_type: Literal["uint16", "uint8"] = "uint16"
    weight_type: Literal["uint8", "int8"] = "uint8"
    per_channel: bool = False
    activation_symmetric: bool = False
    calibrate_method: CalibrateMethod = "MinMax"
    calibration_rows: int | None = Field(None, ge=1, description="first N rows of the npz; null = all")
    op_types: list[str] | None = Field(None, description="null = every op type except Cast (the recipe's default)")
    nodes_to_exclude: list[str] = []


class OrtDynamicSettings(_Settings):
    """Dynamic quantization: int8 weights, activation ranges computed at run time (CPU only)."""

    method: Literal["ort_dynamic"] = "ort_dynamic"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: list[str] | None = Field(None, description="null = ORT's default (MatMul, Gather, ...)")
    nodes_to_exclude: list[str] = []


class NncfPtqSettings(_Settings):
    """NNCF post-training quantization of the OpenVINO model (int8 activations and weights)."""

    method: Literal["nncf_ptq"] = "nncf_ptq"
    preset: Literal["mixed", "performance"] = Field("mixed", description="mixed: asymmetric activations")
    model_type: Literal["transformer"] | None = "transformer"
    subset_size: int = Field(300, ge=1, description="calibration rows used (capped at the rows in the npz)")
    fast_bias_correction: bool = True
    ignored_types: list[str] = Field([], description="OpenVINO op types to keep in float")


class NncfWeightsSettings(_Settings):
    """NNCF weight-only compression: weights stored as int8/int4, activations stay float."""

    method: Literal["nncf_weights"] = "nncf_weights"
    mode: Literal["int8_asym", "int8_sym", "int4_asym", "int4_sym"] = "int8_asym"
    group_size: int | None = Field(None, ge=-1, description="int4 only: weights per scale (-1 = per channel)")
    ratio: float | None = Field(None, gt=0, le=1, description="int4 only: share of layers in int4, rest int8")
    all_layers: bool | None = Field(None, description="int4 only: also int4 for embeddings and the last layer")


VariantSettings = Annotated[
    OrtStaticSettings | OrtQnnSettings | OrtDynamicSettings | NncfPtqSettings | NncfWeightsSettings,
    Field(discriminator="method"),
]

DEFAULT_VARIANTS: dict[str, VariantSettings] = {
    "ort_qdq_a8w8": OrtStaticSettings(),
    "ort_qdq_a16w8": OrtQnnSettings(),
    "ort_dynamic_int8": OrtDynamicSettings(),
    "ov_nncf_int8": NncfPtqSettings(),
    "ov_nncf_w8": NncfWeightsSettings(mode="int8_asym"),
    "ov_nncf_w4": NncfWeightsSettings(mode="int4_sym", group_size=128, ratio=1.0),
}


class QuantizeParams(_Settings):
    variants: dict[str, VariantSettings] = Field(default_factory=lambda: dict(DEFAULT_VARIANTS))
    calibration_chunk: int = Field(
        8, ge=1, description="ORT calibration rows held in memory at once (bounds RAM at long sequences)"
    )

    def variant(self, name: str) -> VariantSettings:
        try:
            return self.variants[name]
        except KeyError:
            raise InputError(
                f"quantize.variants: unknown variant {name!r}; known: {sorted(self.variants)} "
                "(add it under quantize.variants or fix the name)"
            ) from None


def needs_calibration(settings: VariantSettings) -> bool:
    """Whether the variant reads the calibration npz (so callers can skip it as a dependency)."""
    return settings.method in ("ort_static", "ort_qnn", "nncf_ptq")


def artifact_name(settings: VariantSettings) -> str:
    return IR_ARTIFACT if settings.method.startswith("nncf") else ONNX_ARTIFACT


# ---------------------------------------------------------------------------------------------
# inputs


def _model_inputs(model_path: Path) -> dict[str, tuple[np.dtype, tuple]]:
    """Declared graph inputs (name -> numpy dtype, static shape) of an ONNX model."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError, ValueError, ...
        raise InputError(f"{model_path}: not a readable ONNX model ({exc.__class__.__name__}); re-run export_onnx") from exc
    initializers = {i.name for i in graph.initializer}
    declared = {}
    for inp in graph.input:
        if inp.name in initializers:
            continue
        tensor = inp.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        declared[inp.name] = (np.dtype(tensor_dtype_to_np_dtype(tensor.elem_type)), shape)
    return declared


def load_calibration(path: Path, declared: dict[str, tuple[np.dtype, tuple]], rows: int | None) -> dict[str, np.ndarray]:
    """The calibration arrays the model needs, cast to its declared dtypes, [rows, ...] each."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: calibration npz not found; run the calibration_data stage first")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable npz ({exc.__class__.__name__}); rerun calibration_data") from exc
    missing = sorted(set(declared) - set(arrays))
    if missing:
        raise InputError(f"{path}: lacks model input(s) {missing}; it must hold one array per model input")
    feeds = {}
    for name, (dtype, shape) in declared.items():
        arr = arrays[name]
        if arr.ndim != len(shape) or arr.ndim < 1 or arr.shape[0] < 1:
            raise InputError(f"{path}: {name} has shape {arr.shape}, expected [N, ...] matching model input {shape}")
        want = tuple(shape[1:])
        if any(w is not None and w != got for w, got in zip(want, arr.shape[1:], strict=True)):
            raise InputError(
                f"{path}: {name} rows have shape {arr.shape[1:]}, the model expects {want}; "
                "use the calibration file made for this sequence length"
            )
        feeds[name] = arr[:rows].astype(dtype, copy=False)
    return feeds


def _rows(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


class _NpzReader:
    """CalibrationDataReader over in-memory rows; set_range lets ORT calibrate chunk by chunk."""

    def __init__(self, feeds: dict[str, np.ndarray]):
        self.feeds = feeds
        self.start, self.end = 0, _rows(feeds)
        self.pos = self.start

    def __len__(self) -> int:
        return _rows(self.feeds)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.end:
            return None
        i, self.pos = self.pos, self.pos + 1
        return {name: arr[i : i + 1] for name, arr in self.feeds.items()}

    def rewind(self) -> None:
        self.pos = self.start

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self))
        self.pos = self.start


def _chunk(rows: int, limit: int) -> int:
    """The largest chunk <= limit that divides rows (ORT's strided calibration needs a divisor)."""
    return max(d for d in range(1, min(rows, limit) + 1) if rows % d == 0)


# ---------------------------------------------------------------------------------------------
# methods

_QTYPES = {"uint8": "QUInt8", "int8": "QInt8", "uint16": "QUInt16", "int16": "QInt16"}


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return getattr(QuantType, _QTYPES[name])


def _preprocess(model: Path, tmp: Path, settings) -> Path:
    """ORT's pre-processing (shape inference + basic optimisation), then check names from params."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "preprocessed.onnx"
    # The symbolic shape pass crashes on this export's mask subgraph; ONNX shape inference suffices
    # because every shape is static.
    quant_pre_process(str(model), str(out), skip_symbolic_shape=True)
    graph = onnx.load(str(out), load_external_data=False).graph
    where = f"quantize.variants ({settings.method})"
    unknown = sorted(set(settings.nodes_to_exclude) - {n.name for n in graph.node})
    if unknown:
        raise InputError(f"{where}: nodes_to_exclude {unknown[:3]} not in the pre-processed graph of {model}; fix the names")
    tensors = {t for n in graph.node for t in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    unknown = sorted(set(getattr(settings, "tensor_overrides", {})) - tensors)
    if unknown:
        raise InputError(f"{where}: tensor_overrides {unknown[:3]} not tensors of {model}; fix the names")
    present = {n.op_type for n in graph.node}
    if settings.op_types is not None and not set(settings.op_types) & present:
        raise InputError(f"{where}: none of op_types {settings.op_types} occurs in {model}; fix op_types")
    return out


def _tensor_overrides(overrides: dict[str, dict]) -> dict[str, list[dict]]:
    fixed = {}
    for tensor, values in overrides.items():
        entry = dict(values)
        if "quant_type" in entry:
            if entry["quant_type"] not in _QTYPES:
                raise InputError(
                    f"quantize.variants: tensor_overrides[{tensor!r}].quant_type {entry['quant_type']!r} "
                    f"unknown; use one of {sorted(_QTYPES)}"
                )
            entry["quant_type"] = _qtype(entry["quant_type"])
        fixed[tensor] = [entry]
    return fixed


def _ort_static(model: Path, feeds, s: OrtStaticSettings, chunk: int, out: Path, tmp: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    pre = _preprocess(model, tmp, s)
    reader = _NpzReader(feeds)
    extra = {
        "ActivationSymmetric": s.activation_symmetric,
        "CalibStridedMinMax": _chunk(len(reader), chunk),
        "CalibPercentile": s.percentile,
    }
    if s.tensor_overrides:
        extra["TensorQuantOverrides"] = _tensor_overrides(s.tensor_overrides)
    if "16" in s.activation_type or any("16" in str(v.get("quant_type", "")) for v in s.tensor_overrides.values()):
        extra["UseQDQContribOps"] = True  # 16-bit Q/DQ needs opset 21 or the com.microsoft ops
    quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=s.op_types,
        per_channel=s.per_channel,
        reduce_range=s.reduce_range,
        activation_type=_qtype(s.activation_type),
        weight_type=_qtype(s.weight_type),
        nodes_to_exclude=list(s.nodes_to_exclude),
        calibrate_method=getattr(CalibrationMethod, s.calibrate_method),
        extra_options=extra,
    )


def _ort_qnn(model: Path, feeds, s: OrtQnnSettings, chunk: int, out: Path, tmp: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    pre = _preprocess(model, tmp, s)
    reader = _NpzReader(feeds)
    config = get_qnn_qdq_config(
        str(pre),
        reader,
        calibrate_method=getattr(CalibrationMethod, s.calibrate_method),
        activation_type=_qtype(s.activation_type),
        weight_type=_qtype(s.weight_type),
        per_channel=s.per_channel,
        activation_symmetric=s.activation_symmetric,
        stride=_chunk(len(reader), chunk),
        op_types_to_quantize=s.op_types,
        nodes_to_exclude=list(s.nodes_to_exclude) or None,
    )
    quantize(str(pre), str(out), config)


def _ort_dynamic(model: Path, s: OrtDynamicSettings, out: Path, tmp: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    pre = _preprocess(model, tmp, s)
    quantize_dynamic(
        str(pre),
        str(out),
        op_types_to_quantize=s.op_types,
        per_channel=s.per_channel,
        reduce_range=s.reduce_range,
        weight_type=_qtype(s.weight_type),
        nodes_to_exclude=list(s.nodes_to_exclude),
    )


def _nncf_ptq(model: Path, feeds, s: NncfPtqSettings, out: Path) -> int:
    import nncf
    import openvino as ov

    ov_model = ov.Core().read_model(str(model))
    names = [port.get_any_name() for port in ov_model.inputs]
    missing = sorted(set(names) - set(feeds))
    if missing:
        raise InputError(f"calibration npz lacks OpenVINO model input(s) {missing}")
    rows = _rows(feeds)
    dataset = nncf.Dataset(range(rows), lambda i: {n: feeds[n][i : i + 1] for n in names})
    ignored = nncf.IgnoredScope(types=list(s.ignored_types)) if s.ignored_types else None
    quantized = nncf.quantize(
        ov_model,
        dataset,
        preset=nncf.QuantizationPreset(s.preset),
        model_type=nncf.ModelType.TRANSFORMER if s.model_type == "transformer" else None,
        subset_size=min(s.subset_size, rows),
        fast_bias_correction=s.fast_bias_correction,
        **({"ignored_scope": ignored} if ignored else {}),
    )
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return min(s.subset_size, rows)


def _nncf_weights(model: Path, s: NncfWeightsSettings, out: Path) -> None:
    import nncf
    import openvino as ov

    ov_model = ov.Core().read_model(str(model))
    kwargs = {"mode": nncf.CompressWeightsMode(s.mode)}
    if s.mode.startswith("int4"):
        kwargs.update(
            {k: v for k, v in (("group_size", s.group_size), ("ratio", s.ratio), ("all_layers", s.all_layers)) if v is not None}
        )
    elif s.group_size is not None or s.ratio is not None or s.all_layers is not None:
        raise InputError(f"quantize.variants: group_size/ratio/all_layers apply to int4 modes only, not {s.mode}")
    compressed = nncf.compress_weights(ov_model, **kwargs)
    ov.save_model(compressed, str(out), compress_to_fp16=False)


# ---------------------------------------------------------------------------------------------
# artifact inspection


def onnx_quant_counts(path: Path) -> dict[str, int]:
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {
        "quantize_linear_nodes": ops["QuantizeLinear"],
        "dequantize_linear_nodes": ops["DequantizeLinear"],
        "dynamic_quantize_nodes": ops["DynamicQuantizeLinear"] + ops["DynamicQuantizeMatMul"] + ops["MatMulInteger"],
    }


def ir_quant_counts(path: Path) -> dict[str, int]:
    """FakeQuantize ops (activation+weight quantization) and low-bit weight constants in an IR."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    fake = 0
    low_bit = Counter()
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            fake += 1
        elif kind == "Constant":
            et = op.get_output_element_type(0).get_type_name()
            if et in ("u8", "i8", "u4", "i4"):
                low_bit[et] += 1
    return {"fake_quantize_ops": fake, "low_bit_weight_constants": dict(sorted(low_bit.items()))}


def _size_mb(folder: Path, artifact: str) -> float:
    files = [folder / artifact]
    if artifact.endswith(".xml"):
        files.append((folder / artifact).with_suffix(".bin"))
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


# ---------------------------------------------------------------------------------------------


def run(
    *,
    model: Path,
    calibration: Path | None,
    variant: str,
    params: QuantizeParams,
    out_dir: Path,
    key: str,
) -> dict:
    model = Path(model)
    settings = params.variant(variant)
    if not model.is_file() or model.suffix != ".onnx":
        raise InputError(f"{model}: ONNX model not found; run export_onnx (and graph_surgery) first")
    declared = _model_inputs(model)

    feeds = None
    if needs_calibration(settings):
        if calibration is None:
            raise InputError(f"quantize variant {variant!r} ({settings.method}) needs a calibration npz; pass one")
        rows = getattr(settings, "calibration_rows", None)
        feeds = load_calibration(Path(calibration), declared, rows)

    artifact = artifact_name(settings)
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-quant-") as tmp:
        out = scratch / artifact
        used_rows = _rows(feeds) if feeds is not None else 0
        start = time.perf_counter()
        if settings.method == "ort_static":
            _ort_static(model, feeds, settings, params.calibration_chunk, out, Path(tmp))
        elif settings.method == "ort_qnn":
            _ort_qnn(model, feeds, settings, params.calibration_chunk, out, Path(tmp))
        elif settings.method == "ort_dynamic":
            _ort_dynamic(model, settings, out, Path(tmp))
        elif settings.method == "nncf_ptq":
            used_rows = _nncf_ptq(model, feeds, settings, out)
        else:
            _nncf_weights(model, settings, out)
        seconds = time.perf_counter() - start
        for leftover in scratch.iterdir():  # ORT may leave augmented/temporary models beside the output
            if leftover.name not in (artifact, Path(artifact).with_suffix(".bin").name):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

        counts = onnx_quant_counts(out) if artifact == ONNX_ARTIFACT else ir_quant_counts(out)
        if sum(v if isinstance(v, int) else sum(v.values()) for v in counts.values()) == 0:
            raise StageError(
                f"quantize {variant}: the artifact holds no quantized op; check op_types/nodes_to_exclude "
                f"in quantize.variants.{variant}"
            )
        payload = {
            "variant": variant,
            "method": settings.method,
            "settings": settings.model_dump(mode="json"),
            "artifact": artifact,
            "size_mb": _size_mb(scratch, artifact),
            "quantize_time_s": seconds,
            "calibration_rows": used_rows,
            **counts,
            "tool_versions": tool_versions(TOOLS),
        }
        write_stamp(scratch, key, payload)
    return payload
