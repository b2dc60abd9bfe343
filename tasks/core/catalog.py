"""Every artifact path, named once (relative to the project root).

A `Catalog` lays the outputs of one run under its `base`: the project root itself for the run `dvc.lock`
describes (`MAIN`: `params.yaml`, no overrides), or a run folder `runs/<name>/` for a run from another
params file or with overrides, so such a run never writes over the tracked outputs. `dvc.yaml` declares
MAIN's paths; `tests/flows/test_dvc_yaml.py` checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DENSE = "dense"
"""The fetched model itself; other entries of `models` are derived from it (e.g. pruned copies)."""
RUNS = Path("runs")
SENSITIVITY_TABLE = "sensitivity.csv"
"""A sensitivity stage's table in its folder, and all of them together in `metrics/`."""
AUTO_MIXED = "auto_mixed.json"
"""In `metrics/`: every auto_mixed variant's chosen assignment (from its base's sensitivity stage)."""


def model_folder(fetch_dir: Path) -> Path:
    """The model folder (config, tokenizer, safetensors) inside a fetch_model or prune output."""
    return fetch_dir / "model"


DYNAMIC_ONNX = "model_dynamic.onnx"
"""Beside an export's (and graph surgery's) static model.onnx when `export_onnx.dynamic`: the shape axis free."""


def onnx_model(export_dir: Path, dynamic: bool = False) -> Path:
    """An export or graph-surgery folder's model: the static one, or the one with a free shape axis."""
    return export_dir / (DYNAMIC_ONNX if dynamic else "model.onnx")


def dvc_stage_name(stage: str, **matrix: object) -> str:
    """DVC's name for one matrix/foreach instance, e.g. `export_onnx@dense-128`,
    `benchmark@dense-target0-128` (DVC names a list-of-mappings matrix axis by position)."""
    return f"{stage}@{'-'.join(str(v) for v in matrix.values())}" if matrix else stage


@dataclass(frozen=True)
class Catalog:
    base: Path = Path(".")

    @property
    def is_main(self) -> bool:
        return self.base == Path(".")

    @property
    def artifacts(self) -> Path:
        return self.base / "artifacts"

    def fetch_model_dir(self) -> Path:
        return self.artifacts / "fetch_model"

    def prune_dir(self, model: str) -> Path:
        """A model's folder (under `model/`), derived from the fetched one; `dense` is a copy."""
        return self.artifacts / "prune" / model

    def export_onnx_dir(self, model: str, seq_len: int) -> Path:
        return self.artifacts / "export_onnx" / model / f"seq{seq_len}"

    def calibration_data_dir(self) -> Path:
        return self.artifacts / "calibration_data"

    def graph_surgery_dir(self, model: str, seq_len: int) -> Path:
        return self.artifacts / "graph_surgery" / model / f"seq{seq_len}"

    def quantize_dir(self, model: str, variant: str, seq_len: int) -> Path:
        """Every variant, fp32 included (a link to the export), lives here: one path pattern for DVC."""
        return self.artifacts / "quantize" / model / f"{variant}-{seq_len}"

    def compile_dir(self, model: str, variant: str, device: str, target: str, seq_len: int) -> Path:
        return self.artifacts / "compile" / model / f"{variant}-{device}-{target}-{seq_len}"

    def reference_dir(self, seq_len: int) -> Path:
        """fp32 outputs of the dense model: what every model and variant is compared against."""
        return self.artifacts / "reference" / f"seq{seq_len}"

    def benchmark_dir(self, model: str, variant: str, device: str, seq_len: int) -> Path:
        return self.artifacts / "benchmark" / model / f"{variant}-{device}-{seq_len}"

    def bundle_dir(self, model: str, variant: str, device: str) -> Path:
        """A target's deployable bundles (one folder per compile target) and their input-mix timings."""
        return self.artifacts / "bundle" / model / f"{variant}-{device}"

    def race_dir(self) -> Path:
        """Every device's bundle rows timed side by side on the user's inputs (what the recommendation ranks)."""
        return self.artifacts / "race"

    def latency_curve_dir(self, model: str) -> Path:
        """Latency at the extra lengths asked for in latency_curve, for the seq-len choice."""
        return self.artifacts / "latency_curve" / model

    def sensitivity_dir(self, model: str, variant: str, seq_len: int) -> Path:
        """Per-layer-group sensitivity of one variant of one model."""
        return self.artifacts / "sensitivity" / model / f"{variant}-{seq_len}"

    def report_dir(self) -> Path:
        """The report stage owns `metrics/`: benchmark.csv, summary.json and its stage.json."""
        return self.base / "metrics"

    def reports_dir(self) -> Path:
        """The human-facing reports, one folder per run (not a stage output)."""
        return self.base / "reports"

    def rebase(self, path: Path) -> Path:
        """A params path naming a pipeline output (`artifacts/...`, `metrics/...`, e.g. the calibration text
        pool as the seq-len choice's text) means this run's copy of it."""
        if not path.is_absolute() and path.parts and path.parts[0] in ("artifacts", "metrics"):
            return self.base / path
        return path


MAIN = Catalog()


def run_catalog(name: str) -> Catalog:
    return Catalog(RUNS / name)
