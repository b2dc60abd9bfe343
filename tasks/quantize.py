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

import os
import re
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


class NoQuantization(_Settings):
    """The unquantized export (fp32), linked into place so every variant has the same path pattern."""

    method: Literal["none"] = "none"


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
    softmax_input_floor: float | None = Field(
        None,
        lt=0,
        description="clip the calibrated minimum of every Softmax input (attention scores + mask) to this "
        "value, so the mask fill (-1e4) does not stretch the 8-bit scale; weight lost < e^floor",
    )
    residual_type: Literal["uint8", "int8", "uint16", "int16"] | None = Field(
        None,
        description="type for each LayerNormalization input (residual sum) and the sub-layer output added "
        "into it, where BERT's outlier channels live; null = activation_type",
    )
    smooth_layernorm_alpha: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="SmoothQuant-style migration of LayerNorm-output outlier channels into the next "
        "MatMul weights (exact in float; alpha = share of the outlier moved); null = off",
    )
    smooth_rows: int = Field(64, ge=1, description="calibration rows used to measure LayerNorm outputs")
    gemm_linear_layers: bool = Field(
        False,
        description="rewrite each MatMul(x, W) + Add(bias) as Reshape -> Gemm -> Reshape before quantizing, so "
        "ONNX Runtime CPU runs the layer as one QGemm (int8 GEMM, bias folded in); left as MatMul + Add, ORT's "
        "MatMul+Add->Gemm fusion runs before its QDQ fusions, puts a Reshape between the activation's "
        "DequantizeLinear and the layer, and the layer runs in float on weights dequantized every run",
    )
    float_output_op_types: list[str] = Field(
        [],
        description="op types whose outputs get no Q/DQ pair (ORT's OpTypesToExcludeOutputQuantization); "
        "[MatMul, Gemm] lets ORT CPU fuse each into an integer GEMM with a float output instead of "
        "requantizing its result to 8 bits and dequantizing it for the next float op",
    )
    activation_matmuls: bool = Field(
        True,
        description="quantize MatMuls whose inputs are both activations (attention Q.K^T and P.V); false keeps "
        "them float (ORT CPU has no faster integer kernel for these small per-head products)",
    )
    tensor_overrides: dict[str, dict[str, str | float | int | bool]] = Field(
        {}, description="ORT TensorQuantOverrides per tensor: quant_type (e.g. uint16), rmin+rmax, symmetric"
    )


class OrtQnnSettings(_Settings):
    """ONNX Runtime's QDQ recipe for the QNN execution provider (16-bit activations by default), with
    three changes measured on MiniLM against the HTP simulator (README, "QNN recipe"): per-channel int8
    MatMul weights, a floor under the Softmax inputs, and attention's activation x activation MatMuls
    left in float (fp16 on the HTP). Each is a setting; all off is ORT's stock recipe."""

    method: Literal["ort_qnn"] = "ort_qnn"
    activation_type: Literal["uint16", "uint8"] = "uint16"
    weight_type: Literal["uint8", "int8"] = Field(
        "uint8", description="per-tensor weights (LayerNorm, embeddings; MatMul/Gemm unless matmul_per_channel)"
    )
    weight_symmetric: bool | None = Field(
        None, description="null = the recipe's rule (symmetric for signed weight types)"
    )
    matmul_per_channel: bool = Field(
        True,
        description="MatMul/Gemm weights int8, symmetric, one scale per output channel. The stock per-tensor "
        "uint8 weights are asymmetric, and the HTP takes 8-bit weights as int8 around their zero point: "
        "entries beyond it are clipped (one output column per projection off by up to 134 steps)",
    )
    per_channel: bool = Field(False, description="ORT's flag: per-channel Conv weights")
    activation_symmetric: bool = False
    calibrate_method: CalibrateMethod = "MinMax"
    calibration_rows: int | None = Field(None, ge=1, description="first N rows of the npz; null = all")
    softmax_input_floor: float | None = Field(
        -20.0,
        lt=0,
        description="clip the calibrated minimum of every Softmax input (scores + mask) to this value: the "
        "-1e4 mask fill otherwise makes the 16-bit step 0.15 logits, where one rounding flip moves a "
        "probability by 16%; weight lost < e^floor; null = off",
    )
    float_activation_matmuls: bool = Field(
        True,
        description="keep MatMuls of two activations (attention Q.K^T, P.V) and the constant scaling of their "
        "output in float: the HTP runs them in fp16 (compile.qnn_htp.enable_htp_fp16_precision). Quantized, "
        "the HTP computes them below the 16-bit precision the CPU EP runs the QDQ graph at",
    )
    op_types: list[str] | None = Field(None, description="null = every op type except Cast (the recipe's default)")
    nodes_to_exclude: list[str] = []
    qnn_preprocess: bool = Field(
        True,
        description="run ORT's qnn_preprocess_model first (fuses the Erf GELU into Gelu, which the HTP runs; "
        "a bare Erf falls back to the CPU)",
    )


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
    NoQuantization | OrtStaticSettings | OrtQnnSettings | OrtDynamicSettings | NncfPtqSettings | NncfWeightsSettings,
    Field(discriminator="method"),
]

DEFAULT_VARIANTS: dict[str, VariantSettings] = {
    "fp32": NoQuantization(),
    # For ONNX Runtime CPU: Q/DQ only where ORT fuses it into an integer kernel, i.e. every linear layer
    # (one QGemm each, float output); LayerNorm, GELU, Softmax, the residual stream and the per-head
    # attention products stay float: ORT CPU has no faster integer kernel for them, so their Q/DQ pairs
    # only add work (seq 128: 42 ms with every op in QDQ, 14 ms like this, fp32 22-24 ms).
    "ort_qdq_a8w8": OrtStaticSettings(
        op_types=["MatMul", "Gemm"], gemm_linear_layers=True, float_output_op_types=["MatMul", "Gemm"],
        activation_matmuls=False,
    ),
    # Every op in QDQ, 8-bit (what a full-graph NPU partition needs). Measured on all-MiniLM-L6-v2 (STS-B
    # test, seq 128): plain MinMax loses 44 Spearman points (the mask fill swamps the attention scores);
    # floor + 16-bit residual stream + LayerNorm smoothing bring it within 0.4 of fp32.
    "ort_qdq_a8w8_allops": OrtStaticSettings(
        softmax_input_floor=-20.0, residual_type="uint16", smooth_layernorm_alpha=0.85
    ),
    "ort_qdq_a16w8": OrtQnnSettings(),
    "ort_dynamic_int8": OrtDynamicSettings(),
    "ov_nncf_int8": NncfPtqSettings(),
    "ov_nncf_w8": NncfWeightsSettings(mode="int8_asym"),
    "ov_nncf_w4": NncfWeightsSettings(mode="int4_sym", group_size=128, ratio=1.0),
}


class QuantizeParams(_Settings):
    variants: dict[str, VariantSettings] = Field(default_factory=lambda: dict(DEFAULT_VARIANTS))
    calibration_chunk: int = Field(
        4, ge=1, description="ORT calibration rows held in memory at once (bounds RAM at long sequences)"
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
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = _load_graph(model_path)
    initializers = {i.name for i in graph.initializer}
    declared = {}
    for inp in graph.input:
        if inp.name in initializers:
            continue
        tensor = inp.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        declared[inp.name] = (np.dtype(tensor_dtype_to_np_dtype(tensor.elem_type)), shape)
    return declared


def _load_graph(model_path: Path):
    import onnx

    try:
        return onnx.load(str(model_path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError, ValueError, ...
        raise InputError(f"{model_path}: not a readable ONNX model ({exc.__class__.__name__}); re-run export_onnx") from exc


def huge_float_constants(model_path: Path, limit: float = 1e30) -> list[str]:
    """Float initializers/Constants holding |v| > limit: the float-min attention-mask fill of HF exports."""
    from onnx import numpy_helper

    graph = _load_graph(model_path)
    found = []
    tensors = [(i.name, i) for i in graph.initializer]
    tensors += [(n.name or n.output[0], a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for name, tensor in tensors:
        if tensor.data_type in (1, 10, 11, 16) and not tensor.external_data:  # float, float16, double, bfloat16
            arr = numpy_helper.to_array(tensor)
            if arr.size and np.abs(arr.astype(np.float64)).max() > limit:
                found.append(name)
    return found


def _check_mask_fill(model: Path, settings: VariantSettings) -> None:
    """Activation quantization cannot survive a -3.4e38 mask fill: refuse instead of emitting garbage."""
    if settings.method not in ("ort_static", "ort_qnn"):
        return  # dynamic and weight-only quantize no activation ranges; NNCF leaves the mask add in float
    if settings.method == "ort_static" and settings.calibrate_method == "MinMax" and settings.softmax_input_floor is not None:
        return  # the floor clips the fill value out of the attention-score range
    huge = huge_float_constants(model)
    if huge:
        raise InputError(
            f"{model}: float constant(s) {huge[:3]} hold |v| > 1e30 (the attention-mask fill); activation "
            "quantization ranges would be swamped; run graph_surgery (mask fill -1e4) on the model first"
        )


def load_calibration(path: Path, model: Path, rows: int | None) -> dict[str, np.ndarray]:
    """Feeds for every input of `model` from the calibration npz (tokenizer arrays), [rows, ...] each.

    Integer inputs are cast to the declared dtypes; a graph-surgery model's float `attention_bias` /
    `pooling_mask` inputs are built from `attention_mask` (tasks.graph_surgery.build_feeds).
    """
    from tasks.graph_surgery import build_feeds

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: calibration npz not found; run the calibration_data stage first")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name][:rows] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable npz ({exc.__class__.__name__}); rerun calibration_data") from exc
    for name, (_, shape) in _model_inputs(model).items():
        arr = arrays.get(name)
        if arr is None:
            continue  # build_feeds makes it (attention_bias, pooling_mask) or names what is missing
        if arr.ndim != len(shape) or arr.ndim < 1 or arr.shape[0] < 1:
            raise InputError(f"{path}: {name} has shape {arr.shape}, expected [N, ...] matching model input {shape}")
        want = tuple(shape[1:])
        if any(w is not None and w != got for w, got in zip(want, arr.shape[1:], strict=True)):
            raise InputError(
                f"{path}: {name} rows have shape {arr.shape[1:]}, the model expects {want}; "
                "use the calibration file made for this sequence length"
            )
    try:
        return build_feeds(Path(model), arrays)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc


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
        if ("rmin" in entry) != ("rmax" in entry):
            raise InputError(f"quantize.variants: tensor_overrides[{tensor!r}] needs both rmin and rmax")
        for bound in ("rmin", "rmax"):  # ORT needs numpy scalars here, not Python floats
            if bound in entry:
                entry[bound] = np.float32(entry[bound])
        fixed[tensor] = [entry]
    return fixed


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def residual_tensors(graph) -> list[str]:
    """Tensors of the residual stream at each LayerNormalization: its input and the branch added in.

    For LN(Add(branch, skip)) this returns the Add output and the branch output (through Reshape and
    a bias Add back to the MatMul/Gemm that made it); a skip input that is another LN's output is left
    alone, as is anything that is not an activation produced by Add/MatMul/Gemm.
    """
    producers = _producers(graph)
    initializers = {i.name for i in graph.initializer}
    marked: list[str] = []

    def mark(name: str) -> None:
        if name not in marked:
            marked.append(name)

    def branch(name: str) -> None:
        node = producers.get(name)
        while node is not None and node.op_type == "Reshape":  # ORT's MatMul+Add -> Gemm fusion adds Reshapes
            mark(name)
            name = node.input[0]
            node = producers.get(name)
        if node is None or node.op_type not in ("Add", "MatMul", "Gemm", "Mul"):
            return
        mark(name)
        if node.op_type == "Add" and any(i in initializers for i in node.input):  # bias add: MatMul before it
            inner = next(i for i in node.input if i not in initializers)
            if producers.get(inner) is not None and producers[inner].op_type in ("MatMul", "Gemm"):
                mark(inner)

    for node in graph.node:
        if node.op_type != "LayerNormalization":
            continue
        x = node.input[0]
        mark(x)
        add = producers.get(x)
        if add is None or add.op_type != "Add":
            continue
        for name in add.input:
            src = producers.get(name)
            if name in initializers or src is None or src.op_type in ("LayerNormalization", "Gather"):
                continue
            branch(name)
    return marked


def smooth_layernorm_outputs(model: Path, out: Path, feeds: dict[str, np.ndarray], alpha: float, rows: int) -> int:
    """Move LayerNorm-output outlier channels into the weights of the MatMuls that read them.

    BERT's residual stream carries a few huge channels, so each LayerNorm output holds a channel near
    sqrt(hidden) * gamma (e.g. 28 where the rest sit within +-6) and an 8-bit per-tensor scale spends
    its levels on it. Per channel j, with s_j = max|Y_j|^alpha / max|W_j|^(1-alpha) (normalised to the
    median, never below 1): gamma_j, beta_j /= s_j; row j of every consuming weight *= s_j; and the
    residual skip path gets Mul(s) so the sum is unchanged. Exact in float; returns how many
    LayerNorms were smoothed (those read only by MatMul/Gemm weights and residual Adds).
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    proto = onnx.load(str(model))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    producers = _producers(graph)

    def _const(name):  # an initializer's value, also behind the Identity nodes exporters use for tied weights
        node = producers.get(name)
        if name not in inits and node is not None and node.op_type == "Identity":
            name = node.input[0]
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def _private(node, k: int, value: np.ndarray, suffix: str) -> None:  # node.input[k] := a fresh initializer
        name = f"{node.input[k]}/{suffix}"
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        node.input[k] = name

    def readers(name):  # consumers of `name`, looking through Reshape (ORT's Gemm fusion adds them)
        for node in users.get(name, []):
            if node.op_type == "Reshape":
                yield from users.get(node.output[0], [])
            else:
                yield node

    plans = []
    for ln in (n for n in graph.node if n.op_type == "LayerNormalization"):
        found = list(readers(ln.output[0]))
        mats = [n for n in found if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
        others = [n for n in found if n not in mats]
        if not mats or any(n.op_type != "Add" for n in others) or any(_const(i) is None for i in ln.input[1:] if i):
            continue
        plans.append((ln, mats, others))
    if not plans:
        return 0

    probe = onnx.load(str(model))
    probe.graph.output.extend(helper.make_empty_tensor_value_info(ln.output[0]) for ln, _, _ in plans)
    options = ort.SessionOptions()
    # Unoptimised: ORT's constant folding trips over tied (Identity) weights once LN outputs are graph outputs.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [ln.output[0] for ln, _, _ in plans]
    amax = {name: 0.0 for name in names}
    for i in range(min(rows, _rows(feeds))):
        outs = session.run(names, {k: v[i : i + 1] for k, v in feeds.items()})
        for name, arr in zip(names, outs, strict=True):
            amax[name] = np.maximum(amax[name], np.abs(arr.reshape(-1, arr.shape[-1])).max(axis=0))

    def weight(node):  # [in, out] view of the weight (Gemm may store it transposed)
        w = numpy_helper.to_array(inits[node.input[1]])
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        return (w.T if transposed else w), transposed

    after = {}
    for ln, mats, others in plans:
        wmax = np.max([np.abs(weight(n)[0]).max(axis=1) for n in mats], axis=0)
        scale = np.asarray(amax[ln.output[0]], dtype=np.float64) ** alpha / np.maximum(wmax, 1e-8) ** (1 - alpha)
        scale = np.clip(scale / np.median(scale), 1.0, None).astype(np.float32)
        # New initializers rather than edits in place: tied/deduplicated weights may be shared.
        for k in (k for k in (1, 2) if k < len(ln.input) and ln.input[k]):
            _private(ln, k, _const(ln.input[k]) / scale, "smoothed")
        for node in mats:
            w, transposed = weight(node)
            w = w * scale[:, None]
            _private(node, 1, w.T if transposed else w, f"smoothed_{node.name}")
        scale_name, restored = f"{ln.name}/smooth_scale", f"{ln.output[0]}_unsmoothed"
        graph.initializer.append(numpy_helper.from_array(scale, scale_name))
        for node in others:
            for k, name in enumerate(node.input):
                if name == ln.output[0]:
                    node.input[k] = restored
        after[ln.name] = helper.make_node("Mul", [ln.output[0], scale_name], [restored], name=f"{ln.name}/unsmooth")
    nodes = []
    for node in graph.node:  # keep topological order: each Mul right after its LayerNorm
        nodes.append(node)
        if node.op_type == "LayerNormalization" and node.name in after:
            nodes.append(after[node.name])
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)  # the weights the private copies replaced
    onnx.save(proto, str(out))
    return len(plans)


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _constants(graph) -> set[str]:
    """Initializers, and the Identity outputs exporters use to tie a weight to another."""
    names = {i.name for i in graph.initializer}
    return names | {n.output[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in names}


def linear_layers_as_gemm(model: Path, out: Path) -> int:
    """Rewrite every MatMul(x, W) + Add(b) (W [K, N] and b [N] constants, x of static shape) as
    Reshape(x, [M, K]) -> Gemm(x, W, b) -> Reshape([..., N]); exact in float. Returns how many.

    This is what ONNX Runtime's MatMulAddFusion does at session start; done before quantization, the
    quantizer puts the activation's Q/DQ pair right at the Gemm and quantizes the bias to int32, so ORT
    CPU fuses each layer into one QGemm instead of running it in float.
    """
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    proto = shape_inference.infer_shapes(onnx.load(str(model)))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    shapes = {}
    for info in (*graph.value_info, *graph.input):
        dims = info.type.tensor_type.shape.dim
        if len(dims) >= 2 and all(d.HasField("dim_value") for d in dims[:-1]):  # K comes from the weight
            shapes[info.name] = [d.dim_value for d in dims[:-1]]
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    tied = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}

    def constant(name):  # the initializer behind `name`, also through an exporter's Identity (tied weights)
        return inits.get(tied.get(name, name))

    def linear(node):  # (bias Add, weight, bias, input's leading dims) of a MatMul + Add layer, else None
        readers = users.get(node.output[0], [])
        if node.op_type != "MatMul" or len(readers) != 1 or readers[0].op_type != "Add":
            return None
        add = readers[0]
        weight, x_shape = constant(node.input[1]), shapes.get(node.input[0])
        bias = constant(next((i for i in add.input if i != node.output[0]), ""))
        if weight is None or bias is None or len(weight.dims) != 2 or list(bias.dims) != [weight.dims[1]] or not x_shape:
            return None
        return add, weight, bias, x_shape

    nodes, fused_adds, count = [], set(), 0
    for node in graph.node:
        if node.op_type == "Add" and node.output[0] in fused_adds:
            continue
        layer = linear(node)
        if layer is None:
            nodes.append(node)
            continue
        add, weight, bias, x_shape = layer
        k, n = weight.dims
        rows = int(np.prod(x_shape))
        flat_in, flat_out = f"{node.name}/gemm_input", f"{node.name}/gemm_output"
        # A bias of its own: ORT quantizes a Gemm bias initializer to int32 in place, which would also
        # hand that int32 copy to any other reader of a shared (exporter-deduplicated) bias.
        own_bias = f"{node.name}/bias"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([rows, k], np.int64), f"{flat_in}_shape"),
            numpy_helper.from_array(np.array([*x_shape, n], np.int64), f"{add.output[0]}_shape"),
            numpy_helper.from_array(numpy_helper.to_array(bias), own_bias),
        ])
        nodes += [
            helper.make_node("Reshape", [node.input[0], f"{flat_in}_shape"], [flat_in], name=f"{node.name}/flatten"),
            helper.make_node("Gemm", [flat_in, weight.name, own_bias], [flat_out], name=node.name),
            helper.make_node("Reshape", [flat_out, f"{add.output[0]}_shape"], [add.output[0]], name=f"{node.name}/unflatten"),
        ]
        fused_adds.add(add.output[0])
        count += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)  # the biases the private copies replaced
    onnx.save(proto, str(out))
    return count


def _structural_overrides(graph, s: OrtStaticSettings, ranges) -> dict[str, list[dict]]:
    """TensorQuantOverrides from the settings: explicit ones, residual stream type, Softmax floor."""
    overrides = _tensor_overrides(s.tensor_overrides)
    if s.residual_type and s.residual_type != s.activation_type:
        for name in residual_tensors(graph):
            overrides.setdefault(name, [{}])[0].setdefault("quant_type", _qtype(s.residual_type))
    if s.softmax_input_floor is not None:
        for name, (low, high) in _softmax_floor_ranges(graph, ranges, s.softmax_input_floor).items():
            entry = overrides.setdefault(name, [{}])[0]
            entry.setdefault("rmin", low)  # an explicit tensor_overrides range wins
            entry.setdefault("rmax", high)
    return overrides


def _softmax_floor_ranges(graph, ranges, floor: float) -> dict[str, tuple[np.float32, np.float32]]:
    """(rmin, rmax) for every calibrated Softmax input: the floor (kept below the calibrated maximum)
    and that maximum."""
    floored = {}
    for node in graph.node:
        if node.op_type == "Softmax" and node.input[0] in ranges:
            high = float(np.asarray(ranges[node.input[0]].range_value[1]).ravel()[0])
            floored[node.input[0]] = (np.float32(min(floor, high - 1e-3)), np.float32(high))
    return floored


def _ort_static(model: Path, feeds, s: OrtStaticSettings, chunk: int, out: Path, tmp: Path) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    if s.gemm_linear_layers:
        gemm = tmp / "gemm.onnx"
        if linear_layers_as_gemm(model, gemm):
            model = gemm
    pre = _preprocess(model, tmp, s)
    if s.smooth_layernorm_alpha is not None:
        smoothed = tmp / "smoothed.onnx"
        if smooth_layernorm_outputs(pre, smoothed, feeds, s.smooth_layernorm_alpha, s.smooth_rows):
            pre = smoothed
    graph = onnx.load(str(pre), load_external_data=False).graph
    absent = sorted(set(s.float_output_op_types) - {n.op_type for n in graph.node})
    if absent:
        raise InputError(f"quantize.variants (ort_static): float_output_op_types {absent} not in {model}; fix the names")
    excluded = list(s.nodes_to_exclude) + ([] if s.activation_matmuls else activation_matmuls(graph))
    cache = tmp / "calibration.json"
    common = dict(
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=s.op_types,
        per_channel=s.per_channel,
        reduce_range=s.reduce_range,
        activation_type=_qtype(s.activation_type),
        weight_type=_qtype(s.weight_type),
        nodes_to_exclude=excluded,
        calibrate_method=getattr(CalibrationMethod, s.calibrate_method),
        calibration_cache_path=str(cache),
    )
    extra = {
        "ActivationSymmetric": s.activation_symmetric,
        "CalibStridedMinMax": _chunk(_rows(feeds), chunk),
        "CalibPercentile": s.percentile,
        "OpTypesToExcludeOutputQuantization": list(s.float_output_op_types),
    }
    ranges = {}
    if s.softmax_input_floor is not None:
        # Calibrate once (the throwaway model fills the cache), then quantize with ranges that need
        # the calibrated maximum; the second call reads the cache instead of recalibrating.
        quantize_static(str(pre), str(tmp / "calibrated.onnx"), _NpzReader(feeds), extra_options=extra, **common)
        ranges = load_tensors_data(cache).data
    overrides = _structural_overrides(graph, s, ranges)
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    if any(_is16(t) for t in [s.activation_type, *(e[0].get("quant_type") for e in overrides.values())]):
        extra["UseQDQContribOps"] = True  # 16-bit Q/DQ on opset < 21 needs the com.microsoft ops
    quantize_static(str(pre), str(out), _NpzReader(feeds), extra_options=extra, **common)


def _is16(qtype) -> bool:
    return qtype is not None and "16" in str(getattr(qtype, "name", qtype))


def activation_matmuls(graph) -> list[str]:
    """Names of the MatMuls whose two inputs are activations (attention Q.K^T and P.V), and of the Mul/Div
    by a constant that is the sole consumer of one (attention's score scaling), so none gets a QDQ pair."""
    constants = _constants(graph) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names = []
    for node in graph.node:
        if node.op_type != "MatMul" or any(i in constants for i in node.input):
            continue
        names.append(node.name)
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type in ("Mul", "Div") and any(i in constants for i in after[0].input):
            names.append(after[0].name)
    if not all(names):
        raise StageError("quantize: an unnamed attention MatMul cannot be kept in float; name the nodes")
    return names


def _ort_qnn(model: Path, feeds, s: OrtQnnSettings, chunk: int, out: Path, tmp: Path) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if s.qnn_preprocess:
        from tasks.graph_surgery import qnn_preprocess

        fused, _ = qnn_preprocess(onnx.load(str(model)), tmp)
        model = tmp / "qnn_preprocessed.onnx"
        onnx.save(fused, str(model))
    pre = _preprocess(model, tmp, s)
    graph = onnx.load(str(pre), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    overrides = {}
    if s.matmul_per_channel:
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
                transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
                axis = 0 if transposed else 1  # the output channels
                overrides[node.input[1]] = [{"quant_type": _qtype("int8"), "symmetric": True, "axis": axis}]
    excluded = list(s.nodes_to_exclude) + (activation_matmuls(graph) if s.float_activation_matmuls else [])
    config = get_qnn_qdq_config(
        str(pre),
        _NpzReader(feeds),
        calibrate_method=getattr(CalibrationMethod, s.calibrate_method),
        activation_type=_qtype(s.activation_type),
        weight_type=_qtype(s.weight_type),
        per_channel=s.per_channel,
        init_overrides=overrides or None,
        activation_symmetric=s.activation_symmetric,
        weight_symmetric=s.weight_symmetric,
        stride=_chunk(_rows(feeds), chunk),
        op_types_to_quantize=s.op_types,
        nodes_to_exclude=excluded or None,
    )
    # The recipe's `quantize(config)` cannot reuse a calibration; quantize_static with its settings can.
    cache = tmp / "qnn_calibration.json"
    common = dict(
        quant_format=config.quant_format,
        op_types_to_quantize=config.op_types_to_quantize,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=config.activation_type,
        weight_type=config.weight_type,
        nodes_to_quantize=config.nodes_to_quantize,
        nodes_to_exclude=config.nodes_to_exclude,
        calibrate_method=config.calibrate_method,
        calibration_providers=config.calibration_providers,
        extra_options=config.extra_options,
        calibration_cache_path=str(cache),
    )
    if s.softmax_input_floor is not None:
        # Calibrate once (the throwaway model fills the cache), then set each Softmax input's range from
        # the floor and its calibrated maximum; the second call reads the cache instead of recalibrating.
        quantize_static(str(pre), str(tmp / "qnn_calibrated.onnx"), _NpzReader(feeds), **common)
        ranges = load_tensors_data(cache).data
        tensor_overrides = config.extra_options["TensorQuantOverrides"]
        for name, (low, high) in _softmax_floor_ranges(graph, ranges, s.softmax_input_floor).items():
            tensor_overrides.setdefault(name, [{}])[0].update(rmin=low, rmax=high)
    quantize_static(str(pre), str(out), _NpzReader(feeds), **common)


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
    try:
        quantized = nncf.quantize(
            ov_model,
            dataset,
            preset=nncf.QuantizationPreset(s.preset),
            model_type=nncf.ModelType.TRANSFORMER if s.model_type == "transformer" else None,
            subset_size=min(s.subset_size, rows),
            fast_bias_correction=s.fast_bias_correction,
            **({"ignored_scope": ignored} if ignored else {}),
        )
    except nncf.ValidationError as exc:  # e.g. an ignored type that the model does not contain
        raise InputError(f"quantize.variants (nncf_ptq): {str(exc).splitlines()[0][:300]}; fix ignored_types") from exc
    save_ir(quantized, out)
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
    save_ir(compressed, out)


def save_ir(model, out: Path) -> None:
    """Save an OpenVINO model as IR (fp32 weights kept as they are), with reproducible layer names.

    OpenVINO names each op it creates `<Type>_<n>` from a process-wide counter, so the same model saved
    by two processes (or twice in one) differs in those names only; they are renumbered by position.
    """
    import openvino as ov

    for index, op in enumerate(model.get_ordered_ops()):
        kind = op.get_type_name()
        if re.fullmatch(rf"{re.escape(kind)}_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{kind}_{index}")
    ov.save_model(model, str(out), compress_to_fp16=False)


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


def _link_or_copy(source: Path, dest: Path) -> None:
    """A hard link costs no space (DVC's cache dedups by content anyway); copy across filesystems."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


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
    _model_inputs(model)  # an unreadable file fails here, with a one-line InputError
    _check_mask_fill(model, settings)

    feeds = None
    if needs_calibration(settings):
        if calibration is None:
            raise InputError(f"quantize variant {variant!r} ({settings.method}) needs a calibration npz; pass one")
        rows = getattr(settings, "calibration_rows", None)
        feeds = load_calibration(Path(calibration), model, rows)

    artifact = artifact_name(settings)
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-quant-") as tmp:
        out = scratch / artifact
        used_rows = _rows(feeds) if feeds is not None else 0
        start = time.perf_counter()
        if settings.method == "none":
            _link_or_copy(model, out)
        elif settings.method == "ort_static":
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
        if settings.method != "none" and sum(v if isinstance(v, int) else sum(v.values()) for v in counts.values()) == 0:
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
