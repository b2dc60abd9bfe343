"""Quantize: one ONNX model into one variant's artifact by its recipe (`tasks.recipes`), with the checks
and the record every variant gets."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pydantic import Field

from tasks.core.errors import InputError, StageError
from tasks.core.fingerprint import tool_versions
from tasks.core.onnx_graph import input_specs
from tasks.core.params import StrictParams
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings
from tasks.recipes import RECIPES, recipe_for, variant_settings
from tasks.recipes.base import IR_WEIGHTS, RecipeContext, calibration_feeds, rows


class QuantizeParams(StrictParams):
    variants: dict[str, variant_settings()] = Field(
        default_factory=lambda: {"fp32": RECIPES.get("none").settings()},
        description="variant name -> recipe settings (`method` picks the recipe)",
    )
    calibration_chunk: int = Field(
        4, ge=1, description="ORT calibration rows held in memory at once (bounds RAM at long sequences)"
    )

    def variant(self, name: str):
        try:
            return self.variants[name]
        except KeyError:
            raise InputError(
                f"quantize.variants: unknown variant {name!r}; known: {sorted(self.variants)} "
                "(add it under quantize.variants or fix the name)"
            ) from None


def tools(settings) -> tuple[str, ...]:
    """The tools whose versions key a variant: its recipe's."""
    return recipe_for(settings).tools


def needs_calibration(settings) -> bool:
    """Whether the variant reads the calibration npz (so callers can skip it as a dependency)."""
    return recipe_for(settings).needs_calibration(settings)


def artifact_name(settings) -> str:
    return recipe_for(settings).artifact


def _size_mb(folder: Path, recipe) -> float:
    """The deployed files: the artifact and its weights file (an IR's .bin), not records such as encodings."""
    files = [folder / recipe.artifact] + [folder / name for name in recipe.companions if name == IR_WEIGHTS]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


def quantize(model: Path, calibration: Path | None, variant: str, params: QuantizeParams, family: FamilySettings,
             out_dir: Path, tmp: Path, imports: dict[str, Path] | None = None) -> dict:
    """Write the variant's artifact into `out_dir` (an existing folder); returns the stage record. `imports`:
    the files the variant's settings name for this model and length (`RecipeSettings.imports`)."""
    model = Path(model)
    settings = params.variant(variant)
    recipe = recipe_for(settings)
    if not model.is_file() or model.suffix != ".onnx":
        raise InputError(f"{model}: ONNX model not found; run export_onnx (and graph_surgery) first")
    input_specs(model)  # an unreadable file fails here, with a one-line InputError
    recipe.check(model, settings)
    feeds = None
    if recipe.needs_calibration(settings):
        if calibration is None:
            raise InputError(f"quantize variant {variant!r} ({settings.method}) needs a calibration npz; pass one")
        feeds = calibration_feeds(Path(calibration), model, getattr(settings, "calibration_rows", None))
    context = RecipeContext(params.calibration_chunk, FAMILIES.get(family.name).quantization_hints(),
                            imports=dict(imports or {}))

    out = out_dir / recipe.artifact
    start = time.perf_counter()
    facts = recipe.apply(model, feeds, settings, context, out, tmp)
    seconds = time.perf_counter() - start
    kept = {recipe.artifact, *recipe.companions}
    for leftover in out_dir.iterdir():  # ORT may leave augmented/temporary models beside the output
        if leftover.name not in kept:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    counts = recipe.counts(out)
    if settings.method != "none" and sum(v if isinstance(v, int) else sum(v.values()) for v in counts.values()) == 0:
        raise StageError(
            f"quantize {variant}: the artifact holds no quantized op; check op_types/nodes_to_exclude "
            f"in quantize.variants.{variant}"
        )
    return {
        "variant": variant,
        "method": settings.method,
        "settings": settings.model_dump(mode="json"),
        "artifact": recipe.artifact,
        "size_mb": _size_mb(out_dir, recipe),
        "quantize_time_s": seconds,
        "calibration_rows": rows(feeds) if feeds is not None else 0,
        **facts,
        **counts,
        "tool_versions": tool_versions(recipe.tools),
    }
