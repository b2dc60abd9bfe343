"""Export: the family's export module traced to a static-shape ONNX model (and, when asked, the same module with
a dynamic shape axis), checked against torch."""

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
DYNAMIC_MODEL = "model_dynamic.onnx"  # beside the static export when `export_onnx.dynamic` (catalog.DYNAMIC_ONNX)


class ExportOnnxParams(StrictParams):
    opset: int = Field(17, ge=14, le=21)
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    verify_max_abs_err: float = Field(1e-4, gt=0)
    verify_min_cosine: float = Field(0.9999, gt=0, le=1)
    dynamic: bool = Field(
        False, description="also write model_dynamic.onnx (free shape axis) for variants with shape: dynamic"
    )


def _verify(session, module, feeds: list[dict[str, np.ndarray]], spec) -> tuple[float, float, np.ndarray]:
    """Max abs error and min cosine of ONNX Runtime against torch over `feeds` (one batch-1 feed each)."""
    import torch

    max_abs, min_cos = 0.0, 1.0
    with torch.no_grad():
        for one in feeds:
            ref = module(*(torch.from_numpy(one[n]) for n in spec.inputs)).numpy()[0]
            got = session.run([spec.output], one)[0][0]
            max_abs = max(max_abs, float(np.abs(ref - got).max()))
            min_cos = min(min_cos, cosine(ref, got))
    return max_abs, min_cos, got


def export(model_dir: Path, seq_len: int, params: ExportOnnxParams, family: FamilySettings, out: Path,
           dynamic_out: Path | None = None) -> dict:
    """Trace the family's export module at `seq_len` into `out` (and with a free shape axis into `dynamic_out`)
    and check ONNX Runtime against torch; returns what was exported and how well the two agree (StageError when
    they disagree). The dynamic model is checked on each sample at its own length."""
    import onnx
    import onnxruntime as ort
    import torch

    impl = FAMILIES.get(family.name)
    loaded = impl.load(Path(model_dir), family, params.attn_implementation)
    limit = impl.max_shape(loaded)
    if limit is not None and seq_len > limit:
        raise InputError(f"seq_lens: {seq_len} exceeds what the model takes ({limit}); lower it")
    impl.check_shape(loaded, seq_len)
    module, spec = impl.export_module(loaded, family)
    texts = list(impl.verify_samples())  # raw samples: texts, or images for an image family
    samples = impl.samples(loaded.preprocessor, texts, seq_len)
    example = tuple(torch.from_numpy(samples[n][:1]) for n in spec.inputs)
    builds = [(out, None, [{n: samples[n][i : i + 1] for n in spec.inputs} for i in range(len(texts))])]
    if dynamic_out is not None:
        if impl.dynamic_axis is None:
            raise InputError(f"export_onnx.dynamic: family {family.name} has no free shape axis; set it to false")
        axes = {n: {impl.dynamic_axis: "shape"} for n in spec.inputs}
        lengths = np.minimum(impl.input_lengths(loaded.preprocessor, texts), seq_len)
        own = [impl.samples(loaded.preprocessor, [t], int(n)) for t, n in zip(texts, lengths, strict=True)]
        builds.append((dynamic_out, axes, [{n: o[n] for n in spec.inputs} for o in own]))
    checks = {}
    for path, axes, feeds in builds:
        with torch.no_grad():
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=list(spec.inputs),
                output_names=[spec.output],
                opset_version=params.opset,
                do_constant_folding=True,
                dynamic_axes=axes,
                dynamo=False,
            )
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        max_abs, min_cos, got = _verify(session, module, feeds, spec)
        what = "dynamic" if axes else f"seq{seq_len}"
        if max_abs > params.verify_max_abs_err or min_cos < params.verify_min_cosine:
            raise StageError(
                f"export_onnx {what}: ONNX disagrees with torch (max abs err {max_abs:.2e} > "
                f"{params.verify_max_abs_err:.0e} or cosine {min_cos:.6f} < {params.verify_min_cosine}); "
                "try another opset or attn_implementation: eager"
            )
        checks[what] = (max_abs, min_cos, got)
    max_abs, min_cos, got = checks[f"seq{seq_len}"]
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
        **({"dynamic": {"model": dynamic_out.name, "verify_max_abs_err": checks["dynamic"][0],
                        "verify_min_cosine": checks["dynamic"][1]}} if dynamic_out is not None else {}),
    }
