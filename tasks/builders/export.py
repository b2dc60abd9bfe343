"""Export: the family's export module traced to a static-shape ONNX model, checked against torch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.core.errors import InputError, StageError
from tasks.core.onnx_graph import cosine
from tasks.core.params import StrictParams
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings

TOOLS = ("torch", "transformers", "onnx", "onnxruntime")
MODEL = "model.onnx"


class ExportOnnxParams(StrictParams):
    opset: int = Field(17, ge=14, le=21)
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    verify_max_abs_err: float = Field(1e-4, gt=0)
    verify_min_cosine: float = Field(0.9999, gt=0, le=1)


def export(model_dir: Path, seq_len: int, params: ExportOnnxParams, family: FamilySettings, out: Path) -> dict:
    """Trace the family's export module at `seq_len` into `out` and check ONNX Runtime against torch;
    returns what was exported and how well the two agree (StageError when they disagree)."""
    import onnx
    import onnxruntime as ort
    import torch

    impl = FAMILIES.get(family.name)
    loaded = impl.load(Path(model_dir), family, params.attn_implementation)
    limit = impl.max_shape(loaded)
    if limit is not None and seq_len > limit:
        raise InputError(f"seq_lens: {seq_len} exceeds what the model takes ({limit}); lower it")
    module, spec = impl.export_module(loaded, family)
    samples = impl.samples(loaded.preprocessor, list(impl.verify_texts()), seq_len)
    example = tuple(torch.from_numpy(samples[n][:1]) for n in spec.inputs)
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            str(out),
            input_names=list(spec.inputs),
            output_names=[spec.output],
            opset_version=params.opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(out))

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    max_abs, min_cos = 0.0, 1.0
    with torch.no_grad():
        for i in range(len(samples["input_ids"])):
            one = {n: samples[n][i : i + 1] for n in spec.inputs}
            ref = module(*(torch.from_numpy(one[n]) for n in spec.inputs)).numpy()[0]
            got = session.run([spec.output], one)[0][0]
            max_abs = max(max_abs, float(np.abs(ref - got).max()))
            min_cos = min(min_cos, cosine(ref, got))
    if max_abs > params.verify_max_abs_err or min_cos < params.verify_min_cosine:
        raise StageError(
            f"export_onnx seq{seq_len}: ONNX disagrees with torch (max abs err {max_abs:.2e} > "
            f"{params.verify_max_abs_err:.0e} or cosine {min_cos:.6f} < {params.verify_min_cosine}); "
            "try another opset or attn_implementation: eager"
        )
    return {
        "seq_len": seq_len,
        "family": family.name,
        "model_type": loaded.config.model_type,
        "inputs": list(spec.inputs),
        "output": spec.output,
        "output_width": int(np.prod(got.shape)),
        **impl.describe_export(Path(model_dir), family),
        "opset": params.opset,
        "verify_max_abs_err": max_abs,
        "verify_min_cosine": min_cos,
    }
