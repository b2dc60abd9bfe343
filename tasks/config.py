"""The one config model: `params.yaml` loaded and validated before any stage runs.

Sections are named after the DVC stages that read them (each stage module defines its own params), so
`dvc.yaml` lists exactly the params a stage reads and the Prefect cache key hashes the same. What only the
flows read (paths, tracking, execution) is defined here. Cross-section rules (a target's variant exists,
the family can be scored on the evaluation sets, no calibration text is an evaluation set ...) are checked
here, so a bad config stops before the first stage.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from tasks.backends import BACKENDS
from tasks.core.catalog import DENSE
from tasks.core.errors import ConfigError, InputError
from tasks.core.params import StrictParams
from tasks.data.evaluation import EvaluationParams
from tasks.families import FAMILIES, family_settings
from tasks.recipes import recipe_for
from tasks.stages.benchmark import BenchmarkParams
from tasks.stages.bundle import BundleParams, precision_target
from tasks.stages.calibration_data import CalibrationDataParams
from tasks.stages.compile import CompileCheckParams
from tasks.stages.export_onnx import ExportOnnxParams
from tasks.stages.fetch_model import FetchModelParams
from tasks.stages.graph_surgery import GraphSurgeryParams
from tasks.stages.latency_curve import LatencyCurveParams, Target
from tasks.stages.prune import PruneParams, misplaced_message
from tasks.stages.quantize import QuantizeParams
from tasks.stages.race import RaceParams
from tasks.stages.reference import ReferenceParams
from tasks.stages.report import ReportParams
from tasks.stages.sensitivity import SensitivityParams, check_probeable

_NAME = re.compile(r"[a-z0-9_]+")
BASELINE_VARIANT = "fp32"
"""The unquantized variant every accuracy budget is measured against."""


class PathsParams(StrictParams):
    """Where paths named in params.yaml may point. Inside the project is always allowed; anything
    outside (through `..`, an absolute path or a symlink) only under one of `read_roots`."""

    read_roots: list[Path] = Field(
        [], description="folders outside the project that params may read from (relative to the project root or absolute)"
    )


class ExecutionParams(StrictParams):
    """Where the fanned-out stages (compile, benchmark, latency curve) run."""

    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="threads of the flow process, or a Dask cluster (needs a Prefect server)"
    )
    max_workers: int = Field(
        1, ge=1, description="threads: stages at once; keep 1 on a machine that also measures latency"
    )
    dask_address: str | None = Field(None, description="dask: scheduler address (tcp://host:8786); null = local cluster")
    dask_workers: int = Field(2, ge=1, description="dask, local cluster: worker processes, one thread each")


class TrackingParams(StrictParams):
    tracking_uri: str | None = Field(None, description="null: MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str = "edgeopt"


class CompileJob(StrictParams):
    """One compiled artifact per sequence length: a quantize variant for a device and target."""

    variant: str
    device: str
    target: str = Field(description="qnn_htp: a SoC under compile.qnn_htp.targets; OpenVINO: a label")


class _CompileBase(CompileCheckParams):
    # At least one: dvc.yaml's report stage depends on the artifacts/compile folder, which must exist.
    jobs: list[CompileJob] = Field(
        default_factory=lambda: [CompileJob(variant="fp32", device="openvino_cpu", target="host")],
        min_length=1,
        description="what is compiled for which device",
    )

    def checks(self) -> CompileCheckParams:
        """The settings every device shares (what a compile stage's key holds besides its device section)."""
        return CompileCheckParams(**{k: getattr(self, k) for k in CompileCheckParams.model_fields})

    def device(self, name: str):
        return getattr(self, name)


def compile_devices() -> list[str]:
    """Devices with a compile step (their backend defines `compile_params`)."""
    return [name for name, backend in BACKENDS.all().items() if backend.compile_params is not None]


# `compile.<device>` for every device that compiles, from the backend registry: a new device needs no edit here.
CompileParams = create_model(
    "CompileParams",
    __base__=_CompileBase,
    **{
        name: (BACKENDS.get(name).compile_params, Field(default_factory=BACKENDS.get(name).compile_params))
        for name in compile_devices()
    },
)


class EdgeoptConfig(StrictParams):
    seq_lens: list[int] = Field([128, 512], min_length=1)
    models: list[str] = Field(
        [DENSE], min_length=1, description="the fetched model (dense) and copies derived from it; each runs the whole DAG"
    )
    variants: list[str] = Field([BASELINE_VARIANT], min_length=1)
    targets: list[Target] = Field([Target(variant=BASELINE_VARIANT, device="ort_cpu")], min_length=1)
    family: family_settings() = Field(default_factory=lambda: FAMILIES.get("sentence_encoder").settings())
    evaluation: EvaluationParams
    paths: PathsParams = PathsParams()
    fetch_model: FetchModelParams = FetchModelParams()
    prune: PruneParams = Field(default_factory=PruneParams)
    export_onnx: ExportOnnxParams = ExportOnnxParams()
    reference: ReferenceParams = ReferenceParams()
    calibration_data: CalibrationDataParams
    graph_surgery: GraphSurgeryParams = GraphSurgeryParams()
    quantize: QuantizeParams = Field(default_factory=QuantizeParams)
    compile: CompileParams = Field(default_factory=CompileParams)
    benchmark: BenchmarkParams = BenchmarkParams()
    bundle: BundleParams = BundleParams()
    race: RaceParams = RaceParams()
    latency_curve: LatencyCurveParams = LatencyCurveParams()
    sensitivity: SensitivityParams = SensitivityParams()
    report: ReportParams = ReportParams()
    tracking: TrackingParams = TrackingParams()
    execution: ExecutionParams = ExecutionParams()

    @field_validator("seq_lens")
    @classmethod
    def _seq_lens(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if s <= 2 or s > 8192]
        if bad:
            raise ValueError(f"lengths must be between 3 and 8192, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate lengths in {v}")
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
        unknown = sorted({t.device for t in v} - set(BACKENDS.names()))
        if unknown:
            raise ValueError(f"unknown device(s) {unknown}; known: {BACKENDS.names()}")
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
    def _baseline(self) -> EdgeoptConfig:
        baseline = self.quantize.variants.get(BASELINE_VARIANT)
        if baseline is None or baseline.method != "none":
            raise ValueError(f"quantize.variants.{BASELINE_VARIANT}: must be {{method: none}} (the accuracy baseline)")
        measured = [t for t in self.targets
                    if t.variant == BASELINE_VARIANT and not getattr(BACKENDS.get(t.device), "simulated", False)]
        if not measured:
            raise ValueError(
                f"targets: no {{variant: {BASELINE_VARIANT}, device: ort_cpu}}: every accuracy budget is measured "
                "against it; add it"
            )
        return self

    @model_validator(mode="after")
    def _compile_jobs(self) -> EdgeoptConfig:
        devices = compile_devices()
        for i, job in enumerate(self.compile.jobs):
            where = f"compile.jobs[{i}]"
            if job.device not in devices:
                raise ValueError(f"{where}: device {job.device!r} has no compile step; use one of {devices}")
            if job.variant not in self.variants:
                raise ValueError(f"{where}: variant {job.variant!r} is not in variants {self.variants}; add it there")
            try:
                self.compile.device(job.device).check_target(job.target)
            except ConfigError as exc:
                raise ValueError(f"{where}: {exc}") from None
        if len({(j.variant, j.device, j.target) for j in self.compile.jobs}) != len(self.compile.jobs):
            raise ValueError("compile.jobs: a (variant, device, target) job is listed twice")
        return self

    @model_validator(mode="after")
    def _targets_use_built_variants(self) -> EdgeoptConfig:
        missing = sorted({t.variant for t in self.targets} - set(self.variants))
        if missing:
            raise ValueError(f"targets use variant(s) {missing} that are not in variants {self.variants}; add them there")
        return self

    def is_dynamic(self, variant: str) -> bool:
        """Whether the variant is built with a free shape axis (`shape: dynamic`)."""
        return self.quantize.variant(variant).shape == "dynamic"

    @model_validator(mode="after")
    def _dynamic_shapes(self) -> EdgeoptConfig:
        dynamic = [name for name in self.variants if self.is_dynamic(name)]
        for name in dynamic:
            where, settings = f"quantize.variants.{name}", self.quantize.variant(name)
            if not recipe_for(settings).dynamic_shapes:
                raise ValueError(f"{where}: method {settings.method} builds static shapes only; remove shape: dynamic")
            if not self.export_onnx.dynamic:
                raise ValueError(f"{where}: shape: dynamic is built from the dynamic export; set export_onnx.dynamic: true")
            if FAMILIES.get(self.family.name).dynamic_axis is None:
                raise ValueError(f"{where}: family {self.family.name} exports static shapes only; remove shape: dynamic")
            if self.graph_surgery.float_mask_input and settings.method != "none":
                raise ValueError(f"{where}: graph_surgery.float_mask_input pins the mask to one length; set it to false "
                                 "or remove shape: dynamic")
        for i, t in enumerate(self.targets):
            if t.variant in dynamic and not BACKENDS.get(t.device).dynamic_shapes:
                raise ValueError(f"targets[{i}]: {t.device} takes static shapes only; {t.variant} has shape: dynamic")
        for i, job in enumerate(self.compile.jobs):
            if job.variant in dynamic:
                raise ValueError(f"compile.jobs[{i}]: {job.variant} has shape: dynamic (benchmarked from its quantize "
                                 "output; compiled artifacts take static shapes); remove the job")
        probed = sorted(set(dynamic) & set(self.sensitivity.variants))
        if probed:
            raise ValueError(f"sensitivity.variants: {probed} have shape: dynamic; probes are built at one static length")
        return self

    @model_validator(mode="after")
    def _buckets(self) -> EdgeoptConfig:
        for device, shapes in self.bundle.buckets.items():
            where = f"bundle.buckets.{device}"
            if device not in {t.device for t in self.targets}:
                raise ValueError(f"{where}: no target runs on {device}; name a device of targets")
            outside = sorted(set(shapes) - set(self.seq_lens))
            if not shapes or outside:
                raise ValueError(f"{where}: {outside or shapes} must be lengths of seq_lens {self.seq_lens} (each "
                                 "bucket is built like a length); add them to seq_lens")
            if len(set(shapes)) != len(shapes):
                raise ValueError(f"{where}: a length is listed twice")
        return self

    @model_validator(mode="after")
    def _pinned(self) -> EdgeoptConfig:
        for device, lengths in self.bundle.pinned.items():
            where = f"bundle.pinned.{device}"
            if not any(t.device == device and self.is_dynamic(t.variant) for t in self.targets):
                raise ValueError(f"{where}: no target runs a shape: dynamic variant on {device}; pinning applies to "
                                 "a dynamic artifact")
            if not BACKENDS.get(device).pins_shapes:
                raise ValueError(f"{where}: {device} does not pin a dynamic artifact's shapes; remove it")
            top = self.bucket_shapes(device)[-1]
            if lengths != sorted(set(lengths)) or not lengths or lengths[0] < 1 or lengths[-1] != top:
                raise ValueError(f"{where}: {lengths} must be distinct, ascending lengths ending at {top} (the "
                                 f"dynamic artifact's maximum: the largest bucket length of {device})")
        return self

    @model_validator(mode="after")
    def _precisions(self) -> EdgeoptConfig:
        for device, precisions in self.bundle.precisions.items():
            where = f"bundle.precisions.{device}"
            if not any(t.device == device and self.is_dynamic(t.variant) for t in self.targets):
                raise ValueError(f"{where}: no target runs a shape: dynamic variant on {device}; a static variant's "
                                 "engine precision is a compile.jobs target (host_<precision>)")
            backend = BACKENDS.get(device)
            if backend.compile_params is None or "inference_precision" not in inspect.signature(backend.load).parameters:
                raise ValueError(f"{where}: {device} takes no engine precision; remove it")
            if len(set(precisions)) != len(precisions):
                raise ValueError(f"{where}: a precision is listed twice")
            for precision in precisions:
                try:
                    backend.compile_params().check_target(precision_target(precision))
                except ConfigError as exc:
                    raise ValueError(f"{where}: {precision!r} is not a precision of {device} ({exc})") from None
        return self

    def bucket_shapes(self, device: str) -> list[int]:
        """The lengths a device's bundles route to (ascending)."""
        return sorted(self.bundle.buckets.get(device, self.seq_lens))

    @model_validator(mode="after")
    def _sensitivity(self) -> EdgeoptConfig:
        s = self.sensitivity
        unknown = sorted(set(s.variants) - set(self.variants))
        if unknown:
            raise ValueError(f"sensitivity.variants: {unknown} not in variants {self.variants}; add them there or "
                             "remove them from sensitivity.variants")
        for name in s.variants:
            try:
                check_probeable(name, self.quantize.variant(name), s.axis(name))
            except InputError as exc:
                raise ValueError(str(exc)) from None
        models = sorted(set(s.models) - set(self.models))
        if s.variants and models:
            raise ValueError(f"sensitivity.models: {models} not in models {self.models}")
        if s.seq_len is not None and s.seq_len not in self.seq_lens:
            raise ValueError(f"sensitivity.seq_len: {s.seq_len} is not one of seq_lens {self.seq_lens}")
        axes = sorted(set(s.axes) - set(s.variants))
        if axes:
            raise ValueError(f"sensitivity.axes: {axes} not in sensitivity.variants")
        if len(set(s.variants)) != len(s.variants) or len(set(s.models)) != len(s.models):
            raise ValueError("sensitivity: a variant or model is listed twice")
        return self

    @model_validator(mode="after")
    def _auto_mixed(self) -> EdgeoptConfig:
        s = self.sensitivity
        for name in self.variants:
            settings = self.quantize.variant(name)
            if settings.method != "auto_mixed":
                continue
            where = f"quantize.variants.{name}"
            base = self.quantize.variants.get(settings.base)
            if base is None or base.method == "auto_mixed":
                raise ValueError(f"{where}.base: {settings.base!r} is not a variant to build on; name one under "
                                 "quantize.variants (not another auto_mixed)")
            if settings.base not in s.variants or "kept" not in s.probes:
                raise ValueError(f"{where}: its layer groups are chosen by the sensitivity stage of {settings.base!r}; "
                                 f"add {settings.base!r} to sensitivity.variants (with probe `kept`)")
            missing = sorted(set(self.models) - set(s.models))
            if missing:
                raise ValueError(f"{where}: sensitivity.models lacks {missing}; every model building it needs its probes")
        return self

    def sensitivity_seq_len(self) -> int:
        return self.sensitivity.seq_len if self.sensitivity.seq_len is not None else self.seq_lens[0]

    @model_validator(mode="after")
    def _evaluation_fits_family(self) -> EdgeoptConfig:
        family = FAMILIES.get(self.family.name)
        names = self.evaluation.names()
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation.sets: names {names} must be unique")
        for i, eval_set in enumerate(self.evaluation.sets):
            if eval_set.format not in family.eval_formats:
                raise ValueError(
                    f"evaluation.sets[{i}] ({eval_set.name}): format {eval_set.format} cannot score family "
                    f"{self.family.name} ({family.output_kind} output); use one of {list(family.eval_formats)}"
                )
        return self

    @model_validator(mode="after")
    def _inputs_fit_family(self) -> EdgeoptConfig:
        """The family's modality decides what calibrates it and which prune settings apply."""
        modality = FAMILIES.get(self.family.name).modality
        if modality == "image" and self.calibration_data.sources:
            raise ValueError(f"calibration_data.sources: family {self.family.name} calibrates on images; replace "
                             "sources by calibration_data.images (an image folder or a CSV of image paths)")
        if modality != "image" and self.calibration_data.images:
            raise ValueError(f"calibration_data.images: family {self.family.name} calibrates on text; replace images "
                             "by calibration_data.sources (text files)")
        for model in self.models:  # the models run (an unused entry may be inherited from another family's params)
            misplaced = self.prune.model(model).misplaced(modality)
            if misplaced:
                raise ValueError(misplaced_message(model, misplaced, self.family.name, modality))
        return self

    @model_validator(mode="after")
    def _calibration_is_not_evaluation(self, info: ValidationInfo) -> EdgeoptConfig:
        root = Path((info.context or {}).get("root", "."))  # relative paths in params are from the project root
        evaluated = {(root / p).resolve(): s.name for s in self.evaluation.sets for p in s.files().values()}
        field = "sources" if self.calibration_data.sources else "images"
        for i, source in enumerate(self.calibration_data.inputs()):
            path = (root / source.path).resolve()
            how, name = "is", evaluated.get(path)
            if name is None and field == "images" and source.format == "folder":
                # An image folder inside an evaluation folder (or holding one) shares its images.
                how, name = "shares a folder with", next(
                    (n for e, n in evaluated.items() if path.is_relative_to(e) or e.is_relative_to(path)), None)
            if name is not None:
                raise ValueError(
                    f"calibration_data.{field}[{i}]: {source.path} {how} evaluation set {name!r}; "
                    "never calibrate or distil on what is evaluated"
                )
        return self

    def device_simulated(self, device: str) -> bool:
        """Whether the device's latencies come from a simulator on this machine (QNN HTP on x86-64)."""
        return bool(getattr(BACKENDS.get(device), "simulated", False))


def _format_validation_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling"
    elif first["type"] == "missing":
        msg = "missing; add this section or key"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{path}: {field}: {msg}{more}"


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied: mappings merge key by key, anything else is replaced. A mapping of another
    kind (its `name` or `method` differs, e.g. another family or recipe) replaces the base's whole, since the old
    kind's options would not fit it."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not _other_kind(merged[key], value):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _other_kind(base: dict, override: dict) -> bool:
    return any(k in base and k in override and base[k] != override[k] for k in ("name", "method"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params(path: Path | str, seen: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a params file; ConfigError with a one-line message on any problem. A file with
    `extends: <other params file>` is that file (relative to it) with its own keys merged over it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    if "extends" in raw:
        base = path.parent / str(raw.pop("extends"))
        if base.resolve() in seen:
            raise ConfigError(f"{path}: extends {base} again (a cycle); extend a file that extends nothing")
        raw = merge(read_params(base, (*seen, path.resolve())), raw)
    return raw


def load_config(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None) -> EdgeoptConfig:
    """Read and validate `params.yaml` (with `overrides` merged in, e.g. from a deployment);
    raise ConfigError with a one-line message on any problem."""
    path = Path(path)
    raw = read_params(path)
    if overrides:
        raw = merge(raw, overrides)
    try:
        return EdgeoptConfig.model_validate(raw, context={"root": path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from exc
