"""What a model family is: the small protocol every stage talks to instead of assuming a BERT embedder.

A family knows how to check and load a model folder, wrap the model for export (inputs and the one output
the device runs), turn raw samples into model inputs for a shape (a token length for text), which
evaluation formats its output can be scored on, what can be pruned, and which graph facts its
quantization recipes may use. Stages get their family from `tasks.families.FAMILIES` by the name in
params.yaml (`family.name`); adding a family is one module plus one registry line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tasks.core.params import StrictParams
from tasks.transforms.layer_groups import LayerGroup


class FamilySettings(StrictParams):
    """Each family's settings add `name: Literal["<family>"]` (the discriminator) and their options."""


@dataclass
class LoadedModel:
    """A model folder loaded for torch: its preprocessor (e.g. a tokenizer), the model and its HF config."""

    folder: Path
    preprocessor: Any
    model: Any
    config: Any


@dataclass(frozen=True)
class ExportSpec:
    """What the exported graph takes and gives (names, in order)."""

    inputs: tuple[str, ...]
    output: str


class QuantizationHints(Protocol):
    """Graph facts a recipe may ask of the family (a family without them raises InputError)."""

    def residual_tensors(self, graph) -> list[str]:
        """Tensors of the residual stream that deserve a wider quantization type."""

    def smooth_outliers(self, model: Path, out: Path, feeds: dict[str, np.ndarray], alpha: float, rows: int) -> int:
        """Migrate activation outlier channels into the next weights (exact in float); how many were moved."""

    def layer_groups(self, model: Path) -> list[LayerGroup]:
        """The model's linear layers in the groups a per-layer precision is chosen for."""


class ModelFamily(Protocol):
    name: str
    settings: type[FamilySettings]
    modality: str
    """"text" (samples are strings) or "image"."""
    shape_axis: str
    """What `seq_lens` means for this family, for labels (e.g. "sequence length (tokens)")."""
    shape_unit: str
    """The unit of one shape in a sentence ("128 tokens", "224 px")."""
    dynamic_axis: int | None
    """The axis of every input that `seq_lens` sizes, freed in a dynamic export (`export_onnx.dynamic`);
    None: the family exports static shapes only. A row of a dynamic model's feeds is cut to `input_lengths`."""
    output_kind: str
    """"embedding" or "logits": what the exported graph's output is."""
    eval_formats: tuple[str, ...]
    """Evaluation set formats (tasks.data.evaluation) this family's output can be scored on."""
    prunable: bool
    """Whether `pruning_layout` gives a layout; without one the prune stage passes a model that prunes nothing
    (dense) through unchanged."""

    def check_folder(self, folder: Path, config: dict, settings: FamilySettings) -> None:
        """InputError when the folder's model is not one this family supports (checked at fetch)."""

    def folder_files(self, folder: Path) -> list[Path]:
        """Files of a model folder the pipeline keeps (config, preprocessor, weights, pooling config...)."""

    def prepare_folder(self, folder: Path, settings: FamilySettings) -> None:
        """Write what the family derives from a fetched folder's files or its settings (image_classifier:
        preprocess.json)."""

    def load_preprocessor(self, model_dir: Path) -> Any: ...

    def save_preprocessor(self, preprocessor: Any, folder: Path) -> None:
        """Write what `load_preprocessor(folder)` reads back (a deployable bundle carries it)."""

    def load(self, model_dir: Path, settings: FamilySettings, attn_implementation: str = "eager") -> LoadedModel: ...

    def max_shape(self, loaded: LoadedModel) -> int | None:
        """The largest shape the model accepts (e.g. max_position_embeddings), None if unbounded."""

    def check_shape(self, loaded: LoadedModel, shape: int) -> None:
        """InputError when the model cannot take `shape` below its max_shape (e.g. a ViT size that is not a
        multiple of its patch size)."""

    def folder_max_shape(self, folder: Path) -> int | None:
        """`max_shape` read from a model folder's files before anything loads it (None if unbounded)."""

    def export_module(self, loaded: LoadedModel, settings: FamilySettings) -> tuple[Any, ExportSpec]:
        """A torch module whose forward takes the export inputs (in order) and returns the one output."""

    def describe_export(self, model_dir: Path, settings: FamilySettings) -> dict:
        """What the export module does beyond the model (e.g. pooling), for the export record."""

    def samples(self, preprocessor: Any, samples: list, shape: int) -> dict[str, np.ndarray]:
        """Model inputs for raw samples at `shape`: [len(samples), ...] arrays named like the export inputs (a
        superset is fine: `tasks.core.feeds.build_feeds` passes on what a model declares)."""

    def verify_samples(self) -> tuple:
        """Fixed raw samples the export and compile checks run (texts short to truncated; images of several
        aspect ratios): at least `compile.verify_count` (8)."""

    def synthetic_samples(self, model, shape: int) -> dict[str, np.ndarray]:
        """Inputs made from the exported ONNX alone (no preprocessor), for checks on the graph."""

    def class_names(self, model_dir: Path) -> list[str] | None:
        """Output index -> class name for classifiers; None for embedders."""

    def input_lengths(self, preprocessor: Any, samples: list) -> np.ndarray:
        """Each sample's size along the shape axis (tokens for text), for choosing a static shape."""

    def pruning_layout(self, config: Any):
        """How to prune this architecture (tasks.families.encoder_pruning.EncoderLayout) or raise InputError."""

    def encode(self, preprocessor: Any, samples: list, max_shape: int) -> list:
        """Samples prepared once for distillation (token ids for text), batched later by `collate`."""

    def collate(self, encoded: list, pad_id: int) -> dict:
        """One training batch (torch tensors named like the export inputs) of encoded samples."""

    def distill_loss(self, settings: Any, module: Any):
        """loss(student_output, teacher_output) for recovering a pruned model of this family."""

    def quantization_hints(self) -> QuantizationHints | None: ...
