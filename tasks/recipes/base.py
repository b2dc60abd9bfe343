"""What a quantization recipe is, and what every recipe shares.

A recipe is one module with a settings class (`method: Literal[...]`, the discriminator of
`quantize.variants` entries), whether it reads calibration data, the file it writes and `apply`, which
turns one ONNX model into one quantized artifact. Registered in `tasks.recipes.RECIPES`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from tasks.core.errors import InputError
from tasks.core.calibration_arrays import ROW_LENGTHS
from tasks.core.feeds import build_feeds
from tasks.core.onnx_graph import input_specs
from tasks.core.params import StrictParams
from tasks.transforms.quant_rewrites import huge_float_constants

ONNX_ARTIFACT = "model.onnx"
IR_ARTIFACT = "model.xml"
IR_WEIGHTS = "model.bin"


class RecipeSettings(StrictParams):
    """Each recipe's settings add `method: Literal["<method>"]` and their options."""

    method: str
    shape: Literal["static", "dynamic"] = Field(
        "static", description="static: built from the export at each length; dynamic: from the export with a free "
        "shape axis (export_onnx.dynamic), calibrated on real inputs at their own length, for engines that need "
        "no static shapes (ONNX Runtime CPU, OpenVINO CPU)",
    )

    def imports(self, model: str, seq_len: int) -> dict[str, Path]:
        """Files from outside the pipeline this variant reads for one pipeline model and length, by role (keyed
        into its quantize stage like an input and handed to the recipe as `RecipeContext.imports`). Most read none."""
        return {}


class LayerNormSmoothing(StrictParams):
    """SmoothQuant-style migration of LayerNorm-output outlier channels into the next MatMul weights (exact in
    float), for recipes that quantize a transformer's LayerNorm outputs (`smoothed`)."""

    smooth_layernorm_alpha: float | None = Field(
        None, gt=0, lt=1, description="share of each LayerNorm-output outlier moved into the next MatMul weights "
        "(exact in float); null = off",
    )
    smooth_rows: int = Field(64, ge=1, description="calibration rows used to measure LayerNorm outputs")


@dataclass(frozen=True)
class RecipeContext:
    """What the quantize stage hands every recipe besides the model and its settings."""

    calibration_chunk: int
    """Calibration rows held in memory at once."""
    hints: Any = None
    """The model family's QuantizationHints (tasks.families.base), or None."""
    imports: dict[str, Path] = field(default_factory=dict)
    """The settings' `imports` for this model and length (e.g. an AIMET export's model and encodings)."""


class Recipe(Protocol):
    method: str
    settings: type[RecipeSettings]
    artifact: str
    tools: tuple[str, ...]
    companions: tuple[str, ...]
    """Files the recipe writes beside the artifact that the output keeps (e.g. an encodings JSON)."""
    dynamic_shapes: bool
    """Whether it builds `shape: dynamic` variants (calibrating on rows of different lengths, `row`)."""

    def needs_calibration(self, settings: RecipeSettings) -> bool: ...

    def check(self, model: Path, settings: RecipeSettings) -> None:
        """InputError before any work when the model cannot take this recipe."""

    def apply(self, model: Path, feeds: dict[str, np.ndarray] | None, settings: RecipeSettings,
              context: RecipeContext, out: Path, tmp: Path) -> dict[str, Any]:
        """Write the artifact to `out`; returns facts for the stage record (e.g. calibration rows used)."""

    def counts(self, artifact: Path) -> dict[str, Any]:
        """How many quantization ops the artifact holds (0 everywhere: nothing was quantized)."""


class RaggedFeeds(dict):
    """Calibration feeds of a model with a free shape axis: [rows, L] arrays padded to L, each row cut to its own
    length (`lengths`, along `axis`) when taken with `row`."""

    def __init__(self, feeds: dict[str, np.ndarray], lengths: np.ndarray, axis: int):
        super().__init__(feeds)
        self.lengths, self.axis = np.asarray(lengths, dtype=np.int64), axis


def rows(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


def row(feeds: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Row `i` of the feeds as a batch of one (ragged feeds: cut to that row's length)."""
    if isinstance(feeds, RaggedFeeds):
        cut = (slice(i, i + 1),) + (slice(None),) * (feeds.axis - 1) + (slice(0, int(feeds.lengths[i])),)
        return {name: arr[cut] for name, arr in feeds.items()}
    return {name: arr[i : i + 1] for name, arr in feeds.items()}


def refuse_huge_mask_fill(model: Path) -> None:
    """Activation quantization cannot survive a -3.4e38 mask fill: refuse instead of emitting garbage."""
    huge = huge_float_constants(model)
    if huge:
        raise InputError(
            f"{model}: float constant(s) {huge[:3]} hold |v| > 1e30 (the attention-mask fill); activation "
            "quantization ranges would be swamped; run graph_surgery (mask fill -1e4) on the model first"
        )


def calibration_feeds(path: Path, model: Path, limit: int | None) -> dict[str, np.ndarray]:
    """Feeds for every input of `model` from a calibration npz (the family's sample arrays), [rows, ...] each.

    Integer inputs are cast to the declared dtypes; a graph-surgery model's float `attention_bias` /
    `pooling_mask` inputs are built from `attention_mask` (tasks.core.feeds.build_feeds). A model with a free
    shape axis gets `RaggedFeeds` from an npz of one real input per row (with `row_lengths`): each row is
    then calibrated at its own length, as it runs when deployed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: calibration npz not found; run the calibration_data stage first")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name][:limit] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable npz ({exc.__class__.__name__}); rerun calibration_data") from exc
    lengths = arrays.pop(ROW_LENGTHS, None)
    specs = input_specs(model)[0]
    free = sorted({i for spec in specs for i, d in enumerate(spec.shape) if i > 0 and d is None})
    if free and lengths is None:
        raise InputError(f"{path}: {model.name} has a free shape axis but this npz has no {ROW_LENGTHS}; "
                         "a dynamic variant calibrates on the calibration_data file of one input per row")
    for spec in specs:
        arr = arrays.get(spec.name)
        if arr is None:
            continue  # build_feeds makes it (attention_bias, pooling_mask) or names what is missing
        if arr.ndim != len(spec.shape) or arr.ndim < 1 or arr.shape[0] < 1:
            raise InputError(
                f"{path}: {spec.name} has shape {arr.shape}, expected [N, ...] matching model input {list(spec.shape)}"
            )
        want = tuple(spec.shape[1:])
        if any(w is not None and w != got for w, got in zip(want, arr.shape[1:], strict=True)):
            raise InputError(
                f"{path}: {spec.name} rows have shape {arr.shape[1:]}, the model expects {want}; "
                "use the calibration file made for this shape"
            )
    try:
        feeds = build_feeds(Path(model), arrays)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc
    return RaggedFeeds(feeds, lengths, free[0]) if free else feeds


def transformer_hints(context: RecipeContext, method: str, setting: str):
    """The family's QuantizationHints, which a transformer-only `setting` needs; InputError when it has none."""
    if context.hints is None:
        raise InputError(f"quantize.variants ({method}): {setting} needs a transformer model family; remove it")
    return context.hints


def smoothed(model: Path, feeds, settings: LayerNormSmoothing, context: RecipeContext, tmp: Path) -> Path:
    """The model with LayerNorm outliers smoothed when the settings ask for it (and the family can), else itself."""
    if settings.smooth_layernorm_alpha is None:
        return model
    hints = transformer_hints(context, settings.method, "smooth_layernorm_alpha")
    out = tmp / "smoothed.onnx"
    return out if hints.smooth_outliers(model, out, feeds, settings.smooth_layernorm_alpha, settings.smooth_rows) else model
