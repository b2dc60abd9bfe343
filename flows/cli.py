"""`edgeopt`: run the pipeline, run one DVC stage, open the MLflow UI."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tasks.errors import EdgeoptError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml of the project")]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Known errors become one line and exit code 1; anything else keeps its traceback."""
    try:
        yield
    except EdgeoptError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        where = exc.filename or "the project folder"
        err_console.print(
            f"[bold red]error:[/] cannot write {where}: {exc.strerror}; free space or fix permissions, then rerun "
            "(finished stages are reused, nothing half-written was kept)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _rows_table(rows: list[dict]) -> Table:
    table = Table(title="benchmark (metrics/benchmark.csv)")
    columns = ("variant", "device", "seq_len", "size MB", "p50 ms", "p99 ms", "cold ms", "STS-B ρ×100", "drop",
               "in budget", "cos→fp32 min")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("variant", "device") else "left")
    for r in rows:
        table.add_row(
            r["variant"], r["device"], str(r["seq_len"]), f"{r['size_mb']:.1f}", f"{r['latency_p50_ms']:.2f}",
            f"{r['latency_p99_ms']:.2f}", f"{r['cold_start_ms']:.0f}", f"{r['stsb_spearman']:.2f}",
            f"{r['spearman_drop']:+.2f}", "[green]yes[/]" if r["within_budget"] else "[red]no[/]",
            f"{r['cosine_to_fp32_min']:.5f}",
        )
    return table


def _compile_table(rows: list[dict]) -> Table:
    table = Table(title="compile (metrics/compile.csv); simulated timings are not device latency")
    for col in ("variant", "device", "target", "seq_len", "status", "NPU nodes", "CPU fallback", "compile s",
                "cos→source min", "run ms"):
        table.add_column(col)

    def num(value, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    for r in rows:
        run_ms = num(r["verify_run_ms_median"], ".1f") + (" (simulated)" if r["simulated"] and r["verify_run_ms_median"] else "")
        table.add_row(
            r["variant"], r["device"], r["target"], str(r["seq_len"]), r["status"], num(r["npu_nodes"], "d"),
            num(r["cpu_fallback_nodes"], "d"), num(r["compile_s"], ".1f"), num(r["verify_min_cosine"], ".5f"), run_ms,
        )
    return table


@app.command()
def run(params: ParamsOpt = Path("params.yaml")) -> None:
    """Run the whole pipeline as a Prefect flow; unchanged stages are skipped (cached)."""
    with _user_errors():
        from tasks.config import load_config

        root = params.resolve().parent
        from flows import stages

        with contextlib.chdir(root):  # params paths are relative to the project root
            stages.preflight(load_config(params))  # validate before anything starts
        from flows.pipeline import USER_ERROR, pipeline
        from tasks.errors import StageError

        state = pipeline(project_dir=str(root), params_file=params.name, return_state=True)
        if state.name == USER_ERROR:
            raise StageError(state.message)
        result = state.result()
    states = Table(title="stages")
    states.add_column("stage")
    states.add_column("state")
    for name, stage_state in result["stages"].items():
        states.add_row(name, f"[green]{stage_state}[/]" if stage_state == "Cached" else stage_state)
    console.print(states)
    console.print(_rows_table(result["rows"]))
    if result["compile_rows"]:
        console.print(_compile_table(result["compile_rows"]))
    if result.get("mlflow_fallback_reason"):
        err_console.print(f"[yellow]warning:[/] {result['mlflow_fallback_reason']}")
    console.print(f"MLflow parent run {result['mlflow_run_id']} in {result['mlflow_tracking_uri']}: `edgeopt ui` to browse")


def _target(cfg, variant: str, device: str):
    """(index, target) of the params.yaml target with this variant and device."""
    from tasks.errors import ConfigError

    for index, target in enumerate(cfg.targets):
        if (target.variant, target.device) == (variant, device):
            return index, target
    raise ConfigError(f"no target {{variant: {variant}, device: {device}}} in params.yaml targets")


def _job(cfg, variant: str, device: str, target: str):
    from tasks.errors import ConfigError

    for index, job in enumerate(cfg.compile.jobs):
        if (job.variant, job.device, job.target) == (variant, device, target):
            return index, job
    raise ConfigError(
        f"no compile job {{variant: {variant}, device: {device}, target: {target}}} in params.yaml compile.jobs"
    )


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="a stage name in dvc.yaml, e.g. quantize")],
    seq_len: Annotated[int | None, typer.Option(help="for per-length stages")] = None,
    model: Annotated[str, typer.Option(help="for per-model stages: an entry of `models`")] = "dense",
    variant: Annotated[str | None, typer.Option(help="for quantize and benchmark")] = None,
    device: Annotated[str | None, typer.Option(help="for benchmark and compile: a device")] = None,
    target: Annotated[str | None, typer.Option(help="for compile: a job's target (e.g. a QNN SoC)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run one stage instance: the `cmd` of each stage in dvc.yaml."""
    with _user_errors():
        from flows import stages
        from flows.caching import record_result
        from tasks.config import load_config
        from tasks.errors import ConfigError

        cfg = load_config(params)
        with contextlib.chdir(params.resolve().parent):
            stages.preflight(cfg)
        needed = {
            "export_onnx": ("seq_len",),
            "reference": ("seq_len",),
            "graph_surgery": ("seq_len",),
            "quantize": ("variant", "seq_len"),
            "benchmark": ("variant", "device", "seq_len"),
            "compile": ("variant", "device", "target", "seq_len"),
        }.get(name, ())
        given = {"seq_len": seq_len, "variant": variant, "device": device, "target": target}
        missing = [f"--{k.replace('_', '-')}" for k in needed if given[k] is None]
        if missing:
            raise ConfigError(f"stage {name} needs {' '.join(missing)}")
        builders = {
            "fetch_model": lambda: stages.fetch_model(cfg),
            "export_onnx": lambda: stages.export_onnx(cfg, model, seq_len),
            "reference": lambda: stages.reference(cfg, seq_len),
            "calibration_data": lambda: stages.calibration_data(cfg),
            "graph_surgery": lambda: stages.graph_surgery(cfg, model, seq_len),
            "quantize": lambda: stages.quantize(cfg, model, variant, seq_len),
            "benchmark": lambda: stages.benchmark(cfg, model, *_target(cfg, variant, device), seq_len),
            "compile": lambda: stages.compile_device(cfg, model, *_job(cfg, variant, device, target), seq_len),
            "report": lambda: stages.report(cfg),
        }
        if name not in builders:
            raise ConfigError(f"unknown stage {name!r}; known: {', '.join(builders)}")
        if model not in cfg.models:
            raise ConfigError(f"--model {model}: not in params.yaml models {cfg.models}")
        from flows.locking import workspace_lock

        call = builders[name]()
        # `dvc repro` holds DVC's own lock; this one keeps a concurrent `edgeopt run` out.
        with workspace_lock(params.resolve().parent, on_wait=err_console.print):
            result = call.execute()
            record_result(call, result, root=params.resolve().parent)
    console.print(f"{call.name}: done")


@app.command()
def results(
    markdown: Annotated[bool, typer.Option(help="print Markdown tables (what the README's results are)")] = False,
    project: Annotated[Path, typer.Option(help="project root")] = Path("."),
) -> None:
    """Show the last run's metrics/benchmark.csv and metrics/compile.csv."""
    with _user_errors():
        import pandas as pd

        from tasks import catalog
        from tasks.errors import InputError

        tables = {}
        for name in ("benchmark.csv", "compile.csv"):
            path = project / catalog.report_dir() / name
            if not path.is_file():
                raise InputError(f"{path}: not found; run `edgeopt run` (or `dvc repro`) first")
            tables[name] = pd.read_csv(path, keep_default_na=True)
        rows = tables["benchmark.csv"].astype(object).where(tables["benchmark.csv"].notna(), None).to_dict("records")
        compiled = tables["compile.csv"].astype(object).where(tables["compile.csv"].notna(), None).to_dict("records")
    if not markdown:
        console.print(_rows_table(rows))
        console.print(_compile_table(compiled))
        return
    bench = tables["benchmark.csv"]
    fp32 = bench[bench["variant"] == "fp32"].set_index("seq_len")["latency_p50_ms"]
    bench = bench.assign(speedup=fp32.reindex(bench["seq_len"]).to_numpy() / bench["latency_p50_ms"])
    columns = {"variant": "variant", "device": "device", "seq_len": "L", "precision": "precision",
               "size_mb": "MB", "latency_p50_ms": "p50 ms", "latency_p99_ms": "p99 ms",
               "speedup": "× ORT fp32", "stsb_spearman": "STS-B", "spearman_drop": "drop",
               "within_budget": "in budget", "cosine_to_fp32_min": "cos→fp32 min"}
    print(bench[list(columns)].rename(columns=columns).to_markdown(index=False, floatfmt=".2f"))
    print()
    columns = {"variant": "variant", "device": "device", "target": "target", "seq_len": "L", "status": "status",
               "npu_nodes": "NPU nodes", "cpu_fallback_nodes": "CPU fallback", "compile_s": "compile s",
               "cached_compile_s": "cached s", "verify_min_cosine": "cos→source min",
               "verify_run_ms_median": "run ms", "simulated": "simulated"}
    print(tables["compile.csv"][list(columns)].rename(columns=columns).to_markdown(index=False, floatfmt=".4g"))


@app.command()
def validate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Check params.yaml and print the resolved config."""
    with _user_errors():
        from tasks.config import load_config

        cfg = load_config(params)
    console.print_json(cfg.model_dump_json())


@app.command()
def ui(
    params: ParamsOpt = Path("params.yaml"),
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000,
) -> None:
    """Open the MLflow UI on 127.0.0.1 for this project's tracking store."""
    with _user_errors():
        from flows.tracking import tracking_uri
        from tasks.config import load_config

        cfg = load_config(params)
        uri = tracking_uri(cfg, params.resolve().parent)
    console.print(f"MLflow UI for {uri} on http://127.0.0.1:{port}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
