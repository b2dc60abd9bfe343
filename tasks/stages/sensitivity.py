"""Stage sensitivity: how much each linear-layer group of one model costs in accuracy when quantized by one variant.

Reads: the graph-surgery ONNX of one model at one length, the calibration npz for that length, the model folder
(its preprocessor) and the first evaluation set. Writes: `<out>/sensitivity.csv` (one row per probe, validated)
and `<out>/stage.json`.

The groups are the family's (`QuantizationHints.layer_groups`: each linear layer by the module that made it,
attention's query/key/value as one). Two probes per group, each a real build of the variant's recipe with the
group's node patterns added to (`kept`: only this group stays float) or all other groups' patterns set as
(`alone`: only this group is quantized) its `nodes_to_exclude`, then scored on a seeded random subset of the
evaluation set against the fp32 model on the same subset:
- `alone`: the metric lost by quantizing this group alone (what lowering its precision costs);
- `kept`: the metric the fully quantized variant gains back when this group alone stays float.
Each probe calibrates on the first `calibration_rows` rows (a ranking needs fewer than the artifact).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from tasks.backends import get_backend
from tasks.builders.quantize import QuantizeParams, quantize
from tasks.core.catalog import SENSITIVITY_TABLE
from tasks.core.errors import InputError
from tasks.core.fingerprint import atomic_output_dir, write_stamp
from tasks.core.onnx_graph import row_cosines
from tasks.core.params import StrictParams
from tasks.core.schemas import SENSITIVITY_ROWS
from tasks.data import evaluation
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings

TOOLS = ("onnx", "onnxruntime", "transformers", "numpy")
EVAL_DEVICE = "ort_cpu"
Probe = Literal["alone", "kept"]


class SensitivityParams(StrictParams):
    """Per-layer sensitivity of quantized variants (off while `variants` is empty)."""

    variants: list[str] = Field([], description="variants (ORT recipes with nodes_to_exclude) probed per layer group")
    models: list[str] = Field(["dense"], description="entries of `models` probed")
    seq_len: int | None = Field(None, description="the length probed; null = the first of seq_lens")
    probes: list[Probe] = Field(["alone", "kept"], min_length=1,
                                description="alone: only the group quantized; kept: only the group float")
    items: int = Field(200, ge=20, description="evaluation items scored per probe (a seeded random subset)")
    seed: int = 0
    calibration_rows: int = Field(64, ge=1, description="calibration rows per probe's build")
    threads: int = Field(2, ge=1)


def check_probeable(variant: str, settings) -> None:
    """InputError unless the variant's recipe can keep single layers in float (`nodes_to_exclude`)."""
    if "nodes_to_exclude" not in type(settings).model_fields:
        raise InputError(f"sensitivity.variants: {variant!r} (method {settings.method}) cannot keep single layers in "
                         "float; probe a variant of an ONNX Runtime recipe (ort_static, ort_qnn, ort_dynamic)")


def _patched(settings, params: SensitivityParams, exclude: list[str]):
    update = {"nodes_to_exclude": [*settings.nodes_to_exclude, *exclude]}
    if "calibration_rows" in type(settings).model_fields:
        update["calibration_rows"] = params.calibration_rows
    return settings.model_copy(update=update)


def run(*, model: Path, calibration: Path, model_dir: Path, model_name: str, variant: str, seq_len: int, params: SensitivityParams,
        quantize_params: QuantizeParams, family: FamilySettings, eval_set: evaluation.EvalSet, out_dir: Path,
        key: str) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    settings = quantize_params.variant(variant)
    check_probeable(variant, settings)
    impl = FAMILIES.get(family.name)
    hints = impl.quantization_hints()
    if hints is None:
        raise InputError(f"sensitivity: family {family.name!r} names no layer groups; remove sensitivity.variants")
    groups = hints.layer_groups(Path(model))
    if not groups:
        raise InputError(f"{model}: no linear layer (MatMul/Gemm with a weight) to probe; remove sensitivity.variants")
    data = evaluation.load(eval_set, impl.class_names(Path(model_dir)), limit=params.items, seed=params.seed)
    samples = impl.samples(impl.load_preprocessor(Path(model_dir)), data.inputs, seq_len)
    backend = get_backend(EVAL_DEVICE)

    def outputs(artifact: Path) -> np.ndarray:
        loaded = backend.load(artifact, params.threads)
        n = len(next(iter(samples.values())))
        return np.stack([loaded.run({k: v[i : i + 1] for k, v in samples.items()})[0] for i in range(n)])

    probes = [(g, probe) for g in groups for probe in params.probes]
    rows: list[dict] = []
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-sens-") as tmp_name:
        tmp = Path(tmp_name)
        fp32 = outputs(Path(model))
        fp32_metric = data.score(fp32)

        def build_and_score(exclude: list[str]) -> tuple[float, float, float]:
            folder, work = tmp / "artifact", tmp / "work"
            folder.mkdir()
            work.mkdir()
            patched = QuantizeParams(variants={variant: _patched(settings, params, exclude)},
                                     calibration_chunk=quantize_params.calibration_chunk)
            start = time.perf_counter()
            record = quantize(Path(model), Path(calibration), variant, patched, family, folder, work)
            out = outputs(folder / record["artifact"])
            shutil.rmtree(folder)
            shutil.rmtree(work)
            cosine = float(row_cosines(out.reshape(len(out), -1), fp32.reshape(len(fp32), -1)).mean())
            return data.score(out), cosine, time.perf_counter() - start

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(f"sensitivity {variant} L={seq_len}: {len(groups)} layer groups", total=len(probes) + 1)
            full_metric, full_cosine, seconds = build_and_score([])
            progress.advance(task)
            common = {"model": model_name, "variant": variant, "seq_len": seq_len, "eval_set": data.name, "metric_name": data.metric_name,
                      "eval_items": data.items, "fp32_metric": fp32_metric, "variant_metric": full_metric}
            rows.append({**common, "group": "(all)", "probe": "variant", "layers": sum(len(g.nodes) for g in groups),
                         "macs": sum(g.macs for g in groups), "metric_value": full_metric, "cosine_to_fp32": full_cosine,
                         "metric_delta": full_metric - fp32_metric, "seconds": seconds})
            for group, probe in probes:
                others = [p for g in groups if g is not group for p in g.patterns]
                exclude = list(group.patterns) if probe == "kept" else others
                metric, cosine, seconds = build_and_score(exclude)
                rows.append({**common, "group": group.name, "probe": probe, "layers": len(group.nodes),
                             "macs": group.macs, "metric_value": metric, "cosine_to_fp32": cosine,
                             "metric_delta": metric - fp32_metric, "seconds": seconds})
                progress.advance(task)
        SENSITIVITY_ROWS.validate(pd.DataFrame(rows, columns=list(SENSITIVITY_ROWS.columns))).to_csv(
            scratch / SENSITIVITY_TABLE, index=False)
        payload = {"model": model_name, "variant": variant, "seq_len": seq_len, "eval_set": data.name, "metric_name": data.metric_name,
                   "eval_items": data.items, "fp32_metric": fp32_metric, "variant_metric": full_metric,
                   "groups": len(groups), "probes": len(probes)}
        write_stamp(scratch, key, payload)
    return payload
