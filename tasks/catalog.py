"""Every artifact path, named once (relative to the project root).

`dvc.yaml` declares the same paths; `tests/test_dvc_yaml.py` checks the two agree.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")


DENSE = "dense"
"""The fetched model itself; other entries of `models` are derived from it (e.g. pruned copies)."""


def fetch_model_dir() -> Path:
    return ARTIFACTS / "fetch_model"


def model_folder(fetch_dir: Path) -> Path:
    """The Hugging Face folder (config, tokenizer, safetensors) inside a fetch_model output."""
    return fetch_dir / "model"


def prune_dir(model: str) -> Path:
    """A model's HF folder (under `model/`), derived from the fetched one; `dense` is a copy."""
    return ARTIFACTS / "prune" / model


def export_onnx_dir(model: str, seq_len: int) -> Path:
    return ARTIFACTS / "export_onnx" / model / f"seq{seq_len}"


def onnx_model(export_dir: Path) -> Path:
    return export_dir / "model.onnx"


def calibration_data_dir() -> Path:
    return ARTIFACTS / "calibration_data"


def graph_surgery_dir(model: str, seq_len: int) -> Path:
    return ARTIFACTS / "graph_surgery" / model / f"seq{seq_len}"


def quantize_dir(model: str, variant: str, seq_len: int) -> Path:
    """Every variant, fp32 included (a link to the export), lives here: one path pattern for DVC."""
    return ARTIFACTS / "quantize" / model / f"{variant}-{seq_len}"


def variant_model(model: str, variant: str, seq_len: int, artifact_name: str) -> Path:
    return quantize_dir(model, variant, seq_len) / artifact_name


def compile_dir(model: str, variant: str, device: str, target: str, seq_len: int) -> Path:
    return ARTIFACTS / "compile" / model / f"{variant}-{device}-{target}-{seq_len}"


def reference_dir(seq_len: int) -> Path:
    """fp32 embeddings of the dense model: what every model and variant is compared against."""
    return ARTIFACTS / "reference" / f"seq{seq_len}"


def benchmark_dir(model: str, variant: str, device: str, seq_len: int) -> Path:
    return ARTIFACTS / "benchmark" / model / f"{variant}-{device}-{seq_len}"


def latency_curve_dir(model: str) -> Path:
    """Latency at the extra lengths asked for in report.latency_curve, for the seq-len choice."""
    return ARTIFACTS / "latency_curve" / model


def report_dir() -> Path:
    """The report stage owns `metrics/`: benchmark.csv, summary.json and its stage.json."""
    return METRICS


def benchmark_csv() -> Path:
    return report_dir() / "benchmark.csv"


def benchmark_summary() -> Path:
    return report_dir() / "summary.json"


def dvc_stage_name(stage: str, **matrix: object) -> str:
    """DVC's name for one matrix/foreach instance, e.g. `export_onnx@dense-128`,
    `benchmark@dense-target0-128` (DVC names a list-of-mappings matrix axis by position)."""
    return f"{stage}@{'-'.join(str(v) for v in matrix.values())}" if matrix else stage
