"""Stage sensitivity: how much each linear-layer group of one model costs in accuracy when quantized by one variant.

Reads: the graph-surgery ONNX of one model at one length, the calibration npz for that length, the model folder
(its preprocessor) and the first evaluation set. Writes: `<out>/sensitivity.csv` (one row per probe, validated)
and `<out>/stage.json`.

The groups are the family's (`QuantizationHints.layer_groups`: each linear layer by the module that made it,
attention's query/key/value as one). Each group is put at one of two precisions, the variant's axis (`sensitivity.axes`):
- `float`: the lower precision is the variant's quantization, the higher float (`nodes_to_exclude`; any ONNX
  Runtime recipe);
- `a8`: the lower is 8-bit activations, the higher the 16-bit activations of a uint16 `ort_qnn` variant
  (`activations_8bit`, which ORT's mixed-precision fixer turns into the conversions QNN needs).
Rows, each a real build of the variant's recipe scored on a seeded random subset of the first evaluation set
against the fp32 model on the same subset: `all` (every group at the lower precision: on axis float, the variant
itself), `alone` (only this group at the lower precision: what lowering it costs) and `kept` (every group but
this one at the lower precision: what keeping it higher gains back). Each build calibrates on the first
`calibration_rows` rows (a ranking needs fewer than the artifact).

Mixed precision (`mixed`: auto_mixed variant -> its budget, for the variants of recipe `auto_mixed` built on this
one): groups go to the higher precision in the order of their `kept` gain per multiply-accumulate (those without a
gain last, cheapest first); the choice is
the shortest such prefix whose loss against fp32 on the whole evaluation set is within the budget, found from the
subset's answer (`choose_higher_groups`). Writes
`assignment-<auto_mixed variant>.json` (the groups at the higher precision and the full settings they make, which
recipe `auto_mixed` builds) and `override-<variant>.yaml` (the same, to paste into params.yaml).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import Field

from tasks.backends import get_backend
from tasks.builders.quantize import QuantizeParams, quantize
from tasks.core.catalog import SENSITIVITY_TABLE
from tasks.core.errors import InputError
from tasks.core.fingerprint import atomic_output_dir, write_json_atomic, write_stamp
from tasks.core.onnx_graph import row_cosines
from tasks.core.params import StrictParams
from tasks.core.schemas import SENSITIVITY_ROWS
from tasks.data import evaluation
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings
from tasks.transforms.layer_groups import LayerGroup

TOOLS = ("onnx", "onnxruntime", "transformers", "numpy")
EVAL_DEVICE = "ort_cpu"
Probe = Literal["alone", "kept"]
Axis = Literal["float", "a8"]


class SensitivityParams(StrictParams):
    """Per-layer sensitivity of quantized variants (off while `variants` is empty)."""

    variants: list[str] = Field([], description="variants (ONNX Runtime recipes) probed per layer group")
    models: list[str] = Field(["dense"], description="entries of `models` probed")
    seq_len: int | None = Field(None, description="the length probed; null = the first of seq_lens")
    axes: dict[str, Axis] = Field({}, description="variant -> its axis (default float). float: a group is "
                                  "quantized as the variant does it, or float (any ORT recipe, through "
                                  "nodes_to_exclude); a8: a group's activations are uint16 as the variant has them, "
                                  "or uint8 (a uint16 ort_qnn variant, through activations_8bit)")
    probes: list[Probe] = Field(["alone", "kept"], min_length=1,
                                description="alone: only the group at the lower precision; kept: only the group "
                                "at the higher one")
    items: int = Field(200, ge=20, description="evaluation items scored per probe (a seeded random subset)")
    seed: int = 0
    calibration_rows: int = Field(64, ge=1, description="calibration rows per probe's build")
    rank_by: Literal["metric", "cosine"] = Field(
        "metric",
        description="what auto_mixed ranks groups by: the metric their `kept` probe regains, or its cosine to fp32, "
        "far less noisy on a subset (MiniLM, HTP, 100 pairs: the metric's gains were noise of +-1 point; the "
        "cosine ranked the six FFN output layers first, the layers that lose most at 8 bits)",
    )
    threads: int = Field(2, ge=1)

    def axis(self, variant: str) -> Axis:
        return self.axes.get(variant, "float")


def check_probeable(variant: str, settings, axis: Axis = "float") -> None:
    """InputError unless the variant's recipe can place single layers on the axis's two precisions."""
    if axis == "a8" and not (settings.method == "ort_qnn" and settings.activation_type == "uint16"):
        raise InputError(f"sensitivity.variants: {variant!r} (method {settings.method}) is not a uint16 ort_qnn variant; "
                         "axis a8 lowers such a variant's layers to 8-bit activations")
    if "nodes_to_exclude" not in type(settings).model_fields:
        raise InputError(f"sensitivity.variants: {variant!r} (method {settings.method}) cannot keep single layers in "
                         "float; probe a variant of an ONNX Runtime recipe (ort_static, ort_qnn, ort_dynamic)")


def placed(settings, axis: Axis, groups: list[LayerGroup], higher: list[LayerGroup], calibration_rows: int | None):
    """The variant's settings with the groups in `higher` at the axis's higher precision (float, or 16-bit
    activations) and every other group at its lower one (the variant's quantization, or 8-bit activations)."""
    def patterns(chosen):
        return [p for g in chosen for p in g.patterns]

    if axis == "float":
        update = {"nodes_to_exclude": list(dict.fromkeys([*settings.nodes_to_exclude, *patterns(higher)]))}
    else:
        lower = [g for g in groups if g not in higher]
        update = {"activations_8bit": list(dict.fromkeys([*settings.activations_8bit, *patterns(lower)]))}
    if calibration_rows is not None and "calibration_rows" in type(settings).model_fields:
        update["calibration_rows"] = calibration_rows
    return settings.model_copy(update=update)


def assignment_file(variant: str) -> str:
    """The file recipe auto_mixed reads for its variant `variant`, in the sensitivity output of its base."""
    return f"assignment-{variant}.json"


@dataclass
class _Subject:
    """One evaluation set's inputs, and the fp32 model's outputs and metric on them."""

    data: evaluation.EvalData
    samples: dict[str, np.ndarray]
    fp32: np.ndarray
    fp32_metric: float

    def loss(self, metric: float) -> float:
        """Metric points below fp32 (in the metric's own direction)."""
        return self.fp32_metric - metric if self.data.higher_is_better else metric - self.fp32_metric


def choose_higher_groups(groups: list[LayerGroup], gains: dict[str, float], budget: float,
                         subset_loss: Callable[[list[LayerGroup]], float],
                         full_loss: Callable[[list[LayerGroup]], float]) -> tuple[list[LayerGroup], list[dict]]:
    """The groups to put at the higher precision: the shortest prefix, of the groups ordered by `gains` (what a group
    regains there alone: metric points or cosine to fp32, `rank_by`) per MAC and then the rest by MACs, whose loss on the whole set is within `budget`.
    The subset guides (the shortest prefix within budget there, measured step by step); the whole set decides: no
    group first (a loss near the budget can fall either side on a subset), then the subset's prefix, then a
    bisection below it or single steps beyond it. Returns the groups and every measured step."""
    # Groups that regained nothing alone come last, cheapest first: together they may still matter (on the HTP,
    # MiniLM's 12 groups with a gain at 16 bit left 1.19 points lost), and all of them is the base, within budget.
    order = sorted(groups, key=lambda g: (0, -gains[g.name] / g.macs) if gains.get(g.name, 0.0) > 0 else (1, g.macs))
    steps: list[dict] = []

    def measure(n: int, on: str) -> bool:
        loss = (subset_loss if on == "subset" else full_loss)(order[:n])
        steps.append({"on": on, "higher_groups": n, "loss": loss})
        return loss <= budget

    guess = 0
    while not measure(guess, "subset") and guess < len(order):
        guess += 1
    if measure(0, "full"):
        return [], steps
    if guess and measure(guess, "full"):
        failing, passing = 0, guess
        while passing - failing > 1:
            middle = (failing + passing) // 2
            failing, passing = (failing, middle) if measure(middle, "full") else (middle, passing)
        return order[:passing], steps
    n = guess
    while n < len(order):
        n += 1
        if measure(n, "full"):
            break
    return order[:n], steps


def run(*, model: Path, calibration: Path, model_dir: Path, model_name: str, variant: str, seq_len: int,
        params: SensitivityParams, quantize_params: QuantizeParams, family: FamilySettings,
        eval_set: evaluation.EvalSet, out_dir: Path, key: str, mixed: dict[str, float] | None = None) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    settings = quantize_params.variant(variant)
    check_probeable(variant, settings, params.axis(variant))
    impl = FAMILIES.get(family.name)
    hints = impl.quantization_hints()
    if hints is None:
        raise InputError(f"sensitivity: family {family.name!r} names no layer groups; remove sensitivity.variants")
    groups = hints.layer_groups(Path(model))
    if not groups:
        raise InputError(f"{model}: no linear layer (MatMul/Gemm with a weight) to probe; remove sensitivity.variants")
    mixed = dict(mixed or {})
    if mixed and "kept" not in params.probes:
        raise InputError("sensitivity.probes: auto_mixed variants rank groups by the `kept` probe; add it")
    classes = impl.class_names(Path(model_dir))
    preprocessor = impl.load_preprocessor(Path(model_dir))
    backend = get_backend(EVAL_DEVICE)

    def outputs(artifact: Path, samples: dict[str, np.ndarray]) -> np.ndarray:
        loaded = backend.load(artifact, params.threads)
        n = len(next(iter(samples.values())))
        return np.stack([loaded.run({k: v[i : i + 1] for k, v in samples.items()})[0] for i in range(n)])

    def subject(data: evaluation.EvalData) -> _Subject:
        samples = impl.samples(preprocessor, data.inputs, seq_len)
        fp32 = outputs(Path(model), samples)
        return _Subject(data, samples, fp32, data.score(fp32))

    probes = [(g, probe) for g in groups for probe in params.probes]
    rows: list[dict] = []
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-sens-") as tmp_name:
        tmp = Path(tmp_name)
        sub = subject(evaluation.load(eval_set, classes, limit=params.items, seed=params.seed))

        def build(higher: list[LayerGroup], full_calibration: bool = False) -> Path:
            """The variant built with `higher` at the higher precision and the rest at the lower, in tmp/artifact."""
            shutil.rmtree(tmp / "artifact", ignore_errors=True)
            shutil.rmtree(tmp / "work", ignore_errors=True)
            (tmp / "artifact").mkdir()
            (tmp / "work").mkdir()
            built = placed(settings, params.axis(variant), groups, higher, None if full_calibration else params.calibration_rows)
            patched = QuantizeParams(variants={variant: built}, calibration_chunk=quantize_params.calibration_chunk)
            record = quantize(Path(model), Path(calibration), variant, patched, family, tmp / "artifact", tmp / "work")
            return tmp / "artifact" / record["artifact"]

        def score(higher: list[LayerGroup], on: _Subject, full_calibration: bool = False) -> tuple[float, float]:
            artifact = build(higher, full_calibration)
            out = outputs(artifact, on.samples)
            cosine = float(row_cosines(out.reshape(len(out), -1), on.fp32.reshape(len(on.fp32), -1)).mean())
            return on.data.score(out), cosine

        console = Console(stderr=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"sensitivity {variant} L={seq_len}: {len(groups)} layer groups", total=len(probes) + 1)
            start = time.perf_counter()
            full_metric, full_cosine = score([], sub)  # every group at the lower precision
            progress.advance(task)
            common = {"model": model_name, "variant": variant, "seq_len": seq_len, "axis": params.axis(variant),
                      "eval_set": sub.data.name,
                      "metric_name": sub.data.metric_name, "eval_items": sub.data.items, "fp32_metric": sub.fp32_metric,
                      "all_lowered_metric": full_metric}
            rows.append({**common, "group": "(all)", "probe": "all", "layers": sum(len(g.nodes) for g in groups),
                         "macs": sum(g.macs for g in groups), "metric_value": full_metric, "cosine_to_fp32": full_cosine,
                         "metric_delta": full_metric - sub.fp32_metric, "seconds": time.perf_counter() - start})
            for group, probe in probes:
                start = time.perf_counter()
                metric, cosine = score([group] if probe == "kept" else [g for g in groups if g is not group], sub)
                rows.append({**common, "group": group.name, "probe": probe, "layers": len(group.nodes),
                             "macs": group.macs, "metric_value": metric, "cosine_to_fp32": cosine,
                             "metric_delta": metric - sub.fp32_metric, "seconds": time.perf_counter() - start})
                progress.advance(task)
        table = SENSITIVITY_ROWS.validate(pd.DataFrame(rows, columns=list(SENSITIVITY_ROWS.columns)))
        table.to_csv(scratch / SENSITIVITY_TABLE, index=False)

        assignments = {}
        if mixed:
            if params.rank_by == "metric":
                kept = table[table["probe"] == "kept"].set_index("group")["metric_value"]
                sign = 1.0 if sub.data.higher_is_better else -1.0
                gains = {name: sign * (value - full_metric) for name, value in kept.items()}
            else:
                kept = table[table["probe"] == "kept"].set_index("group")["cosine_to_fp32"]
                gains = {name: value - full_cosine for name, value in kept.items()}
            whole = subject(evaluation.load(eval_set, classes))

            def measured(name: str, on: _Subject, full: bool) -> Callable[[list[LayerGroup]], float]:
                def loss(chosen: list[LayerGroup]) -> float:
                    value = on.loss(score(chosen, on, full_calibration=full)[0])
                    console.print(f"auto_mixed {name}: {len(chosen)} group(s) at the higher precision, {value:+.3f} "
                                  f"points below fp32 "
                                  f"on {on.data.items} items")
                    return value
                return loss

            for name, budget in sorted(mixed.items()):
                chosen, steps = choose_higher_groups(groups, gains, budget, measured(name, sub, False),
                                                    measured(name, whole, True))
                built = placed(settings, params.axis(variant), groups, chosen, None)
                assignments[name] = write_assignment(scratch, name, variant, params.axis(variant), budget, chosen, groups, built,
                                                     steps, whole)
        payload = {"model": model_name, "variant": variant, "seq_len": seq_len, "eval_set": sub.data.name,
                   "metric_name": sub.data.metric_name, "eval_items": sub.data.items, "fp32_metric": sub.fp32_metric,
                   "all_lowered_metric": full_metric, "groups": len(groups), "probes": len(probes),
                   "assignments": assignments}
        write_stamp(scratch, key, payload)
    return payload


def chosen_loss(steps: list[dict], higher_groups: int) -> float:
    """The whole-set loss measured for the chosen prefix: a bisection may end on a failing step just below it."""
    return next(s["loss"] for s in reversed(steps) if s["on"] == "full" and s["higher_groups"] == higher_groups)


def write_assignment(folder: Path, name: str, base: str, axis: Axis, budget: float, chosen: list[LayerGroup],
                     groups: list[LayerGroup], built, steps: list[dict], whole: _Subject) -> dict:
    """`assignment-<name>.json` (what recipe auto_mixed builds) and `override-<name>.yaml` (to paste); returns
    the assignment."""
    settings = built.model_dump(mode="json")
    loss = chosen_loss(steps, len(chosen))
    assignment = {
        "variant": name, "base": base, "axis": axis, "budget": budget, "higher_groups": [g.name for g in chosen],
        "groups": len(groups), "higher_macs": sum(g.macs for g in chosen), "macs": sum(g.macs for g in groups),
        "higher_layers": sum(len(g.nodes) for g in chosen), "layers": sum(len(g.nodes) for g in groups),
        "settings": settings, "steps": steps, "eval_items": whole.data.items, "fp32_metric": whole.fp32_metric,
        "loss": loss, "within_budget": loss <= budget,
    }
    write_json_atomic(folder / assignment_file(name), assignment)
    override = {"quantize": {"variants": {name: settings}}}  # pasted over the auto_mixed entry, it freezes the choice
    (folder / f"override-{name}.yaml").write_text(
        f"# auto_mixed {name}: {base} with {len(chosen)} of {len(groups)} layer group(s) at the higher precision "
        f"(axis {axis}), "
        f"{loss:+.3f} points below fp32 on all {whole.data.items} items (budget {budget:g})\n"
        + yaml.safe_dump(override, sort_keys=False, width=120), encoding="utf-8")
    return assignment
