"""Recipe `aimet_qnn`: Qualcomm AIMET's quantization simulation (`aimet-onnx`) for the QNN HTP.

AIMET inserts a quantizer at every tensor the HTP runtime config (`htp_config`, e.g. `htp_v75`) says the
HTP quantizes (weights per channel, biases left to the backend), calibrates them on the project's
calibration rows, and writes:
- `model.onnx`: the same encodings as a QDQ graph (`QuantizationSimModel.to_onnx_qdq`), which the
  `qnn_htp` backend compiles like any other variant and the ONNX Runtime CPU EP runs for accuracy;
- `model.encodings`: AIMET's encodings JSON (format 1.0.0), what Qualcomm's converters take
  (`qnn-onnx-converter --quantization_overrides`) when the float model is compiled outside edgeopt.

Installed without `onnx2torch` (infra/setup.sh): aimet-onnx needs it only for AdaScale and LoRA, and it
pulls torchvision, whose PyPI wheel is built for CUDA torch and breaks the CPU torch this project pins.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.core.errors import StageError
from tasks.recipes._ort import onnx_quant_counts, ort_preprocess
from tasks.recipes.base import (
    ONNX_ARTIFACT,
    LayerNormSmoothing,
    RecipeContext,
    RecipeSettings,
    refuse_huge_mask_fill,
    rows,
    smoothed,
    transformer_hints,
)
from tasks.transforms.quant_rewrites import int32_biases, linear_layers_as_gemm, unshare_biases
from tasks.transforms.surgery import qnn_preprocess

ENCODINGS = "model.encodings"
ENCODING_VERSION = "1.0.0"
HtpConfig = Literal["htp_v68", "htp_v69", "htp_v73", "htp_v75", "htp_v79", "htp_v81"]


class AimetQnnSettings(LayerNormSmoothing, RecipeSettings):
    """AIMET QuantSim with the HTP runtime config: integer weights per channel, activations at
    `activation_bits`, calibrated with `quant_scheme`."""

    method: Literal["aimet_qnn"] = "aimet_qnn"
    activation_bits: Literal[8, 16] = 16
    weight_bits: Literal[4, 8] = 8
    quant_scheme: Literal["min_max", "tf_enhanced"] = Field(
        "min_max", description="min_max: the observed range; tf_enhanced: the range with the least quantization error"
    )
    htp_config: HtpConfig = Field(
        "htp_v75", description="AIMET's runtime config for the HTP generation (Snapdragon 8 Gen 3: v75, X Elite: v73)"
    )
    calibration_rows: int | None = Field(None, ge=1, description="first N rows of the npz; null = all")
    softmax_input_floor: float | None = Field(
        -20.0,
        lt=0,
        description="the lower end of every Softmax input's encoding (scores + mask), not its calibrated minimum: "
        "the -1e4 mask fill otherwise sets the 8-bit step to ~40 logits, every real score falls in one step and "
        "attention turns uniform (MiniLM a8w8: the HTP simulator then disagrees with the CPU EP, cosine 0.65); "
        "weight lost < e^floor; null = off",
    )
    residual_bits: Literal[8, 16] | None = Field(
        None,
        description="bits of each LayerNorm input (residual sum) and the branch added into it, where BERT's outlier "
        "channels live (as ort_static's residual_type); null = activation_bits",
    )
    qnn_preprocess: bool = Field(
        True, description="run ORT's qnn_preprocess_model first (fuses the Erf GELU into Gelu, which the HTP runs)"
    )
    weight_rounding: Literal["nearest", "seq_mse", "adaround"] = Field(
        "nearest",
        description="nearest: weights rounded to the min-max grid; seq_mse: each layer's weight range searched for the "
                    "least output error (AIMET SeqMSE); adaround: each weight's rounding learned (AIMET AdaRound)",
    )
    seq_mse_candidates: int = Field(20, ge=2, description="SeqMSE: weight ranges tried per layer")
    adaround_iterations: int = Field(2000, ge=1, description="AdaRound: optimisation steps per layer")
    rounding_rows: int | None = Field(
        64, ge=1, description="SeqMSE/AdaRound optimise on the first N calibration rows (null = all; every row still "
        "calibrates the activations): SeqMSE's 20 candidates on 300 rows of MiniLM took ~3 min per layer on 2 cores"
    )


def _batches(feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One single-row feed per calibration row (the model's batch dimension is 1)."""
    return [{name: arr[i : i + 1] for name, arr in feeds.items()} for i in range(rows(feeds))]


def quiet_aimet() -> None:
    """AIMET logs every adjusted weight scale at INFO; keep its warnings only."""
    from aimet_onnx.common.utils import AimetLogger

    for area in AimetLogger.LogAreas:
        logging.getLogger(area.value).setLevel(logging.WARNING)


def _softmax_input_maxima(proto, calibration: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Each Softmax input's largest value over the calibration rows, in float. AIMET's own encoding maximum is no
    substitute: snapped to a grid whose step the -1e4 mask fill sets (~40 logits at 8 bits), it can be 0."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    names = [n.input[0] for n in proto.graph.node if n.op_type == "Softmax"]
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    highs = dict.fromkeys(names, -np.inf)
    for row in calibration:
        for name, value in zip(names, session.run(names, row), strict=True):
            highs[name] = max(highs[name], float(value.max()))
    return highs


def prepare_for_htp(model: Path, tmp: Path, *, fuse_gelu: bool = True):
    """The graph AIMET quantizes for the HTP (a ModelProto): what the `qnn_htp` backend needs of a QDQ
    model, done before the quantizers are placed so that the encodings name its tensors."""
    import onnx

    if fuse_gelu:
        fused, _ = qnn_preprocess(onnx.load(str(model)), tmp)
        model = tmp / "qnn_preprocessed.onnx"
        onnx.save(fused, str(model))
    # Each linear layer as one Gemm: AIMET leaves a MatMul's output unquantized when a bias Add follows (one
    # op on the target), and ONNX Runtime's QNN EP then cannot group the MatMul with its weight's DQ.
    gemm = tmp / "gemm.onnx"
    if linear_layers_as_gemm(model, gemm):
        model = gemm
    proto = onnx.load(str(ort_preprocess(model, tmp)))
    unshare_biases(proto.graph)  # AIMET computes no int32 bias scale for a bias two layers read
    for node in proto.graph.node:  # an omitted optional input (Clip's max: '') would get a quantizer named ''
        while node.input and not node.input[-1]:
            node.input.pop()
    return proto


def _aimet_qnn(model: Path, feeds: dict[str, np.ndarray], s: AimetQnnSettings, hints, out: Path, tmp: Path) -> dict:
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel

    quiet_aimet()
    proto = prepare_for_htp(model, tmp, fuse_gelu=s.qnn_preprocess)
    sim = QuantizationSimModel(
        proto,
        param_type=f"int{s.weight_bits}",
        activation_type=f"int{s.activation_bits}",
        quant_scheme=s.quant_scheme,
        config_file=s.htp_config,
        path=str(tmp / "aimet"),
    )
    # `hints` is given when residual_bits differ from activation_bits (checked before this process started).
    residual = hints.residual_tensors(proto.graph) if hints is not None else []
    for name in residual:
        if name in sim.qc_quantize_op_dict:
            sim.qc_quantize_op_dict[name].set_bitwidth(s.residual_bits)
    calibration = _batches(feeds)
    if s.softmax_input_floor is not None:
        for name, high in _softmax_input_maxima(proto, calibration).items():
            if name in sim.qc_quantize_op_dict:
                sim.qc_quantize_op_dict[name].set_fixed_encoding_range((s.softmax_input_floor, high))
    # Both freeze the weight encodings they choose; compute_encodings then calibrates the activations. Both
    # also start from initialised weight encodings, which AIMET would otherwise make on a random input (token
    # ids beyond a token-type table: an ORT Gather error), so the rows calibrate everything once first.
    if s.weight_rounding != "nearest":
        sim.compute_encodings(calibration)
    rounding = calibration[: s.rounding_rows]
    if s.weight_rounding == "seq_mse":
        from aimet_onnx import apply_seq_mse

        apply_seq_mse(sim, rounding, num_candidates=s.seq_mse_candidates)
    elif s.weight_rounding == "adaround":
        from aimet_onnx import apply_adaround

        apply_adaround(sim, rounding, num_iterations=s.adaround_iterations)
    sim.compute_encodings(calibration)
    qdq = sim.to_onnx_qdq(prequantize_constants=True)  # int weights + DQ: the HTP takes no weight Q
    biases = int32_biases(qdq.graph)  # the HTP config leaves biases to the converter; the QNN EP needs them int32
    onnx.checker.check_model(qdq)
    onnx.save(qdq, str(out))
    sim.export(str(tmp), "aimet", export_model=False, encoding_version=ENCODING_VERSION)
    exported = tmp / "aimet.encodings"
    if not exported.is_file():
        raise StageError(f"aimet-onnx wrote no encodings file into {tmp}; check its log above")
    encodings = json.loads(exported.read_text(encoding="utf-8"))
    (out.parent / ENCODINGS).write_text(json.dumps(encodings, indent=1, sort_keys=True), encoding="utf-8")
    return {
        "calibration_rows": len(calibration),
        "rounding_rows": len(rounding) if s.weight_rounding != "nearest" else 0,
        "int32_biases": biases,
        "encodings": {
            "activation": len(encodings.get("activation_encodings", [])),
            "param": len(encodings.get("param_encodings", [])),
        },
    }


class AimetQnnRecipe:
    method = "aimet_qnn"
    settings = AimetQnnSettings
    artifact = ONNX_ARTIFACT
    companions = (ENCODINGS,)
    dynamic_shapes = False  # for the QNN HTP, which takes static shapes only
    tools = ("onnx", "onnxruntime", "aimet-onnx")

    def needs_calibration(self, settings: AimetQnnSettings) -> bool:
        return True

    def check(self, model: Path, settings: AimetQnnSettings) -> None:
        refuse_huge_mask_fill(model)

    def apply(self, model: Path, feeds, settings: AimetQnnSettings, context: RecipeContext, out: Path, tmp: Path) -> dict:
        # A process of its own: AIMET registers its custom ops in ONNX Runtime's process-wide schema registry,
        # and ORT then stamps their domains into every model it saves afterwards (other variants' artifacts).
        model = smoothed(model, feeds, settings, context, tmp)  # before AIMET sees the model
        residual = settings.residual_bits not in (None, settings.activation_bits)
        hints = transformer_hints(context, settings.method, "residual_bits") if residual else None
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(_aimet_qnn, model, feeds, settings, hints, out, tmp).result()

    def counts(self, artifact: Path) -> dict:
        return onnx_quant_counts(artifact)


RECIPE = AimetQnnRecipe()
