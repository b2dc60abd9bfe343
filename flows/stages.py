"""How each stage is called: inputs, params section, outputs, code and tools — in one place.

Both entry points build the same `StageCall` from `params.yaml`: the Prefect flow (`flows.pipeline`)
and the DVC stage runner (`edgeopt stage ...`, the `cmd` of every stage in `dvc.yaml`). So they
compute the same cache key, write the same paths, and agree on what is current. Paths are relative
to the project root, which is the working directory of both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks import benchmark as benchmark_stage
from tasks import calibration_data as calibration_stage
from tasks import catalog
from tasks import compile as compile_stage
from tasks import export_onnx as export_stage
from tasks import fetch_model as fetch_stage
from tasks import graph_surgery as surgery_stage
from tasks import prune as prune_stage
from tasks import latency_curve as latency_curve_stage
from tasks import quantize as quantize_stage
from tasks import reference as reference_stage
from tasks import report as report_stage
from tasks.compile import CompileJob
from tasks.config import EdgeoptConfig, Target
from tasks.fingerprint import stage_key
from tasks.stsb import split_path

SHARED_CODE = ("tasks/fingerprint.py",)
# The source files each stage's result depends on; `dvc.yaml` lists the same files as deps.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "fetch_model": ("tasks/fetch_model.py", *SHARED_CODE),
    "prune": ("tasks/prune.py", "tasks/export_onnx.py", *SHARED_CODE),
    # export_onnx loads pruned folders through tasks/prune.py.
    "export_onnx": ("tasks/export_onnx.py", "tasks/prune.py", *SHARED_CODE),
    "calibration_data": ("tasks/calibration_data.py", "tasks/stsb.py", "tasks/export_onnx.py", *SHARED_CODE),
    "graph_surgery": ("tasks/graph_surgery.py", *SHARED_CODE),
    "quantize": ("tasks/quantize.py", "tasks/graph_surgery.py", *SHARED_CODE),
    "reference": (
        "tasks/reference.py",
        "tasks/export_onnx.py",
        "tasks/bench_worker.py",
        "tasks/stsb.py",
        "tasks/schemas.py",
        "tasks/backends/__init__.py",
        "tasks/backends/base.py",
        "tasks/backends/ort_cpu.py",
        *SHARED_CODE,
    ),
    "benchmark": (
        "tasks/benchmark.py",
        "tasks/export_onnx.py",
        "tasks/graph_surgery.py",
        "tasks/bench_worker.py",
        "tasks/stsb.py",
        "tasks/schemas.py",
        "tasks/backends/__init__.py",
        "tasks/backends/base.py",
        "tasks/backends/ort_cpu.py",  # simulated devices take their accuracy from the CPU EP
        *SHARED_CODE,
    ),
    # Rebuilds artifacts with the pipeline's stage functions, then times them on any target's device.
    "latency_curve": (
        "tasks/latency_curve.py",
        "tasks/seq_len_choice.py",
        "tasks/export_onnx.py",
        "tasks/prune.py",
        "tasks/graph_surgery.py",
        "tasks/calibration_data.py",
        "tasks/stsb.py",
        "tasks/quantize.py",
        "tasks/benchmark.py",
        "tasks/bench_worker.py",
        "tasks/backends/__init__.py",
        "tasks/backends/base.py",
        "tasks/backends/ort_cpu.py",
        "tasks/backends/openvino_cpu.py",
        "tasks/backends/openvino_npu.py",
        "tasks/backends/qnn_htp.py",
        "tasks/backends/_openvino.py",
        *SHARED_CODE,
    ),
    "compile": (
        "tasks/compile.py",
        "tasks/export_onnx.py",
        "tasks/graph_surgery.py",
        "tasks/backends/__init__.py",
        "tasks/backends/base.py",
        *SHARED_CODE,
    ),
    "report": (
        "tasks/report.py",
        "tasks/compile.py",
        "tasks/schemas.py",
        "tasks/seq_len_choice.py",
        "tasks/calibration_data.py",
        "tasks/stsb.py",
        *SHARED_CODE,
    ),
}
# Code a device module imports besides itself. dvc.yaml cannot pick deps per device, so its
# benchmark and compile stages list these for every device (DVC may rerun more, never less).
BACKEND_SHARED_CODE: dict[str, tuple[str, ...]] = {
    "openvino_cpu": ("tasks/backends/_openvino.py",),
    "openvino_npu": ("tasks/backends/_openvino.py",),
}


def device_code(stage: str, device: str) -> tuple[str, ...]:
    return (*STAGE_CODE[stage], f"tasks/backends/{device}.py", *BACKEND_SHARED_CODE.get(device, ()))


@dataclass(frozen=True)
class StageCall:
    """One stage instance (a DVC stage name such as `export_onnx@128`) ready to run."""

    stage: str
    name: str
    fn: Callable[..., dict]
    out_dir: Path
    inputs: dict[str, Path | None] = field(default_factory=dict)
    watch: dict[str, Path] = field(default_factory=dict)
    """Hashed into the key like `inputs`, but not passed to the stage function."""
    params: BaseModel | None = None
    args: dict[str, Any] = field(default_factory=dict)
    code: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()

    @cached_property
    def key(self) -> str:
        return stage_key(
            code_files=[Path(f) for f in self.code],
            tools=self.tools,
            params=self.params,
            inputs={**{k: v for k, v in self.inputs.items() if v is not None}, **self.watch},
            extra={"stage": self.name, "out_dir": self.out_dir.as_posix(), "args": _jsonable(self.args)},
        )

    def execute(self) -> dict:
        kwargs = {**self.inputs, **self.args, "out_dir": self.out_dir, "key": self.key}
        if self.params is not None:
            kwargs["params"] = self.params
        return self.fn(**kwargs)


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    return {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in sorted(args.items())}


def external_inputs(cfg: EdgeoptConfig) -> dict[str, Path]:
    """Files and folders the DAG reads that no stage produces, by the params field that names them."""
    found = {"data.stsb_dir": split_path(cfg.data.stsb_dir, "test")}
    for i, src in enumerate(cfg.calibration_data.sources):
        found[f"calibration_data.sources[{i}].path"] = Path(src.path)
    if cfg.compile.verify_inputs:
        found["compile.verify_inputs"] = Path(cfg.compile.verify_inputs)
    if cfg.fetch_model.source == "path":
        found["fetch_model.path"] = Path(cfg.fetch_model.path)
    return found


def preflight(cfg: EdgeoptConfig, root: Path | None = None) -> None:
    """Fail before any stage runs when a path named in params.yaml is missing or points outside the
    project and every `paths.read_roots` folder. Relative paths are from the project root (`root`,
    default the working directory, as for both entry points)."""
    from tasks.errors import ConfigError, InputError

    root = (root or Path.cwd()).resolve()
    allowed = [root, *((root / r).resolve() for r in cfg.paths.read_roots)]
    for field_name, path in external_inputs(cfg).items():
        resolved = (root / path).resolve()
        if not any(resolved.is_relative_to(a) for a in allowed):
            raise ConfigError(
                f"{field_name}: {path} is outside the project; add its folder to paths.read_roots in params.yaml "
                "to allow reading it"
            )
        if not resolved.exists():
            raise InputError(f"{path}: not found; fix {field_name} in params.yaml (relative to the project root)")


def model_label(cfg: EdgeoptConfig) -> str:
    p = cfg.fetch_model
    return {"package": p.package, "path": Path(p.path or ".").name, "hub": f"{p.hub_id}@{p.revision}"}[p.source]


def fetch_model(cfg: EdgeoptConfig) -> StageCall:
    return StageCall(
        stage="fetch_model",
        name="fetch_model",
        fn=fetch_stage.run,
        out_dir=catalog.fetch_model_dir(),
        inputs={"source_dir": fetch_stage.resolve_source(cfg.fetch_model)},
        params=cfg.fetch_model,
        code=STAGE_CODE["fetch_model"],
        tools=fetch_stage.TOOLS,
    )


def prune(cfg: EdgeoptConfig, model: str) -> StageCall:
    settings = cfg.prune.model(model)
    text = catalog.calibration_data_dir() / calibration_stage.TEXT_POOL if prune_stage.needs_text(settings) else None
    return StageCall(
        stage="prune",
        name=catalog.dvc_stage_name("prune", model=model),
        fn=prune_stage.run,
        out_dir=catalog.prune_dir(model),
        inputs={"model_dir": catalog.model_folder(catalog.fetch_model_dir()), "text": text},
        # Only this model's settings are part of the key: editing one model reruns only that one.
        params=cfg.prune.model_copy(update={"models": {model: settings}}),
        args={"model": model},
        code=STAGE_CODE["prune"],
        tools=prune_stage.TOOLS,
    )


def model_source(model: str) -> Path:
    """The HF folder a model's exports are made from (dense passes through prune unchanged)."""
    return catalog.model_folder(catalog.prune_dir(model))


def export_onnx(cfg: EdgeoptConfig, model: str, seq_len: int) -> StageCall:
    return StageCall(
        stage="export_onnx",
        name=catalog.dvc_stage_name("export_onnx", model=model, seq_len=seq_len),
        fn=export_stage.run,
        out_dir=catalog.export_onnx_dir(model, seq_len),
        inputs={"model_dir": model_source(model)},
        params=cfg.export_onnx,
        args={"seq_len": seq_len},
        code=STAGE_CODE["export_onnx"],
        tools=export_stage.TOOLS,
    )


def reference(cfg: EdgeoptConfig, seq_len: int) -> StageCall:
    return StageCall(
        stage="reference",
        name=catalog.dvc_stage_name("reference", seq_len=seq_len),
        fn=reference_stage.run,
        out_dir=catalog.reference_dir(seq_len),
        inputs={
            "model": catalog.onnx_model(catalog.export_onnx_dir(catalog.DENSE, seq_len)),
            "model_dir": catalog.model_folder(catalog.fetch_model_dir()),
            "stsb_test": split_path(cfg.data.stsb_dir, "test"),
        },
        params=cfg.reference,
        args={"seq_len": seq_len},
        code=STAGE_CODE["reference"],
        tools=reference_stage.TOOLS,
    )


def calibration_data(cfg: EdgeoptConfig) -> StageCall:
    sources = [Path(src.path) for src in cfg.calibration_data.sources]
    return StageCall(
        stage="calibration_data",
        name="calibration_data",
        fn=calibration_stage.run,
        out_dir=catalog.calibration_data_dir(),
        inputs={"model_dir": catalog.model_folder(catalog.fetch_model_dir())},
        watch={f"source_{i}": p for i, p in enumerate(sources)},
        params=cfg.calibration_data,
        args={"sources": sources, "seq_lens": list(cfg.seq_lens)},
        code=STAGE_CODE["calibration_data"],
        tools=calibration_stage.TOOLS,
    )


def graph_surgery(cfg: EdgeoptConfig, model: str, seq_len: int) -> StageCall:
    return StageCall(
        stage="graph_surgery",
        name=catalog.dvc_stage_name("graph_surgery", model=model, seq_len=seq_len),
        fn=surgery_stage.run,
        out_dir=catalog.graph_surgery_dir(model, seq_len),
        inputs={"model": catalog.onnx_model(catalog.export_onnx_dir(model, seq_len))},
        params=cfg.graph_surgery,
        code=STAGE_CODE["graph_surgery"],
        tools=surgery_stage.TOOLS,
    )


def quantize(cfg: EdgeoptConfig, model: str, variant: str, seq_len: int) -> StageCall:
    settings = cfg.quantize.variant(variant)
    unquantized = settings.method == "none"
    # Only this variant's settings are part of the key: editing one variant reruns only that one.
    params = cfg.quantize.model_copy(update={"variants": {variant: settings}})
    source = catalog.export_onnx_dir(model, seq_len) if unquantized else catalog.graph_surgery_dir(model, seq_len)
    calibration = (
        catalog.calibration_data_dir() / calibration_stage.calib_name(seq_len)
        if quantize_stage.needs_calibration(settings)
        else None
    )
    return StageCall(
        stage="quantize",
        name=catalog.dvc_stage_name("quantize", model=model, variant=variant, seq_len=seq_len),
        fn=quantize_stage.run,
        out_dir=catalog.quantize_dir(model, variant, seq_len),
        inputs={"model": catalog.onnx_model(source), "calibration": calibration},
        params=params,
        args={"variant": variant},
        code=STAGE_CODE["quantize"],
        tools=quantize_stage.TOOLS,
    )


def variant_artifact(cfg: EdgeoptConfig, model: str, variant: str, seq_len: int) -> Path:
    """The file a quantize stage writes for this variant (an ONNX model or an OpenVINO IR)."""
    return catalog.variant_model(model, variant, seq_len, quantize_stage.artifact_name(cfg.quantize.variant(variant)))


def compiled_for(cfg: EdgeoptConfig, model: str, target: Target, seq_len: int) -> dict[str, Path]:
    """Compile target -> compile folder of every job that compiles this target's variant for its device:
    the benchmark measures those artifacts rather than the quantize output."""
    return {
        job.target: catalog.compile_dir(model, job.variant, job.device, job.target, seq_len)
        for job in cfg.compile.jobs
        if (job.variant, job.device) == (target.variant, target.device)
    }


def benchmark(cfg: EdgeoptConfig, model: str, index: int, target: Target, seq_len: int) -> StageCall:
    name = catalog.dvc_stage_name("benchmark", model=model, target=f"target{index}", seq_len=seq_len)
    compiled = compiled_for(cfg, model, target, seq_len)
    return StageCall(
        stage="benchmark",
        name=name,
        fn=benchmark_stage.run,
        out_dir=catalog.benchmark_dir(model, target.variant, target.device, seq_len),
        inputs={
            "artifact": variant_artifact(cfg, model, target.variant, seq_len),
            "model_dir": catalog.model_folder(catalog.fetch_model_dir()),
            "stsb_test": split_path(cfg.data.stsb_dir, "test"),
            "reference_embeddings": catalog.reference_dir(seq_len) / reference_stage.EMBEDDINGS,
        },
        watch={f"compiled_{t}": d for t, d in compiled.items()},
        params=cfg.benchmark,
        args={
            "source_model": model_label(cfg),
            "model": model,
            "variant": target.variant,
            "device": target.device,
            "seq_len": seq_len,
            "stage_name": name,
            "compiled": compiled,
        },
        code=device_code("benchmark", target.device),
        tools=benchmark_stage.TOOLS,
    )


def benchmark_calls(cfg: EdgeoptConfig) -> list[StageCall]:
    return [
        benchmark(cfg, m, i, t, s) for m in cfg.models for s in cfg.seq_lens for i, t in enumerate(cfg.targets)
    ]


def compile_device(cfg: EdgeoptConfig, model: str, index: int, job: CompileJob, seq_len: int) -> StageCall:
    name = catalog.dvc_stage_name("compile", model=model, job=f"job{index}", seq_len=seq_len)
    # Only this job is part of the key: adding or editing another job does not rerun this one.
    params = cfg.compile.model_copy(update={"jobs": [job]})
    return StageCall(
        stage="compile",
        name=name,
        fn=compile_stage.run,
        out_dir=catalog.compile_dir(model, job.variant, job.device, job.target, seq_len),
        inputs={
            "model": variant_artifact(cfg, model, job.variant, seq_len),
            "model_dir": catalog.model_folder(catalog.fetch_model_dir()),
        },
        watch={"verify_inputs": cfg.compile.verify_inputs} if cfg.compile.verify_inputs else {},
        params=params,
        args={
            "device": job.device,
            "target": job.target,
            "record": {"model": model, "variant": job.variant, "seq_len": seq_len, "dvc_stage": name},
        },
        code=device_code("compile", job.device),
        tools=compile_stage.tools(job.device),
    )


def compile_calls(cfg: EdgeoptConfig) -> list[StageCall]:
    return [
        compile_device(cfg, m, i, j, s)
        for m in cfg.models
        for s in cfg.seq_lens
        for i, j in enumerate(cfg.compile.jobs)
    ]


def latency_curve(cfg: EdgeoptConfig, model: str) -> StageCall:
    """Latency at the extra lengths `report.latency_curve.seq_lens` (none: an empty stage), for the
    seq-len choice. One stage per model, so its output folder always exists for the report's DVC deps."""
    settings = latency_curve_stage.LatencyCurveSettings(
        latency_curve=cfg.report.latency_curve,
        export_onnx=cfg.export_onnx,
        graph_surgery=cfg.graph_surgery,
        calibration_data=cfg.calibration_data,
        # Only the variants the targets use: editing another variant does not rerun the curve.
        quantize=cfg.quantize.model_copy(
            update={"variants": {t.variant: cfg.quantize.variant(t.variant) for t in cfg.targets}}
        ),
        benchmark=cfg.benchmark,
        targets=cfg.targets,
    )
    return StageCall(
        stage="latency_curve",
        name=catalog.dvc_stage_name("latency_curve", model=model),
        fn=latency_curve_stage.run,
        out_dir=catalog.latency_curve_dir(model),
        inputs={"model_dir": model_source(model)},
        watch={f"source_{i}": Path(src.path) for i, src in enumerate(cfg.calibration_data.sources)},
        params=settings,
        args={"sources": [Path(src.path) for src in cfg.calibration_data.sources], "model": model},
        code=STAGE_CODE["latency_curve"],
        tools=latency_curve_stage.TOOLS,
    )


def latency_curve_calls(cfg: EdgeoptConfig) -> list[StageCall]:
    return [latency_curve(cfg, m) for m in cfg.models]


def report(cfg: EdgeoptConfig) -> StageCall:
    dirs = [c.out_dir for c in benchmark_calls(cfg)]
    compiled = [c.out_dir for c in compile_calls(cfg)]
    curves = [c.out_dir for c in latency_curve_calls(cfg)]
    return StageCall(
        stage="report",
        name="report",
        fn=report_stage.run,
        out_dir=catalog.report_dir(),
        inputs={
            "model_dir": catalog.model_folder(catalog.fetch_model_dir()),
            "text": Path(cfg.report.seq_len_choice.text.path),
        },
        # Hash each configured output folder; the DVC stage depends on their parent folders.
        watch={
            **{f"benchmark_{i}": d for i, d in enumerate(dirs)},
            **{f"compile_{i}": d for i, d in enumerate(compiled)},
            **{f"latency_curve_{i}": d for i, d in enumerate(curves)},
        },
        params=cfg.report,
        args={"benchmark_dirs": dirs, "compile_dirs": compiled, "curve_dirs": curves},
        code=STAGE_CODE["report"],
        tools=report_stage.TOOLS,
    )


def prepare_calls(cfg: EdgeoptConfig) -> list[StageCall]:
    """Every stage before compile and benchmark, in an order that respects their dependencies."""
    calls = [fetch_model(cfg), calibration_data(cfg), *(prune(cfg, model) for model in cfg.models)]
    for model in cfg.models:
        for seq_len in cfg.seq_lens:
            calls.append(export_onnx(cfg, model, seq_len))
            if model == catalog.DENSE:
                calls.append(reference(cfg, seq_len))
            calls.append(graph_surgery(cfg, model, seq_len))
            calls.extend(quantize(cfg, model, variant, seq_len) for variant in cfg.variants)
    return calls


def all_calls(cfg: EdgeoptConfig) -> list[StageCall]:
    """The whole DAG, one StageCall per DVC stage instance."""
    return [*prepare_calls(cfg), *compile_calls(cfg), *benchmark_calls(cfg), *latency_curve_calls(cfg), report(cfg)]
