"""`edgeopt`: run the pipeline, run one DVC stage, open the MLflow UI."""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.core.errors import EdgeoptError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml of the project")]
RunOpt = Annotated[str | None, typer.Option("--run", help="a run folder under runs/ (default: the tracked outputs)")]
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _folder_name(name: str, option: str) -> str:
    """A single folder name: nothing that could lead outside the folder it is made in."""
    if not _FOLDER_NAME.fullmatch(name):
        from tasks.core.errors import ConfigError

        raise ConfigError(f"{option} {name!r}: use letters, digits, '.', '_' and '-' only (one folder name)")
    return name


def _run_output(params: Path, run_name: str | None, table: str, why: str):
    """(project root, config, the run's catalog, the run's metrics/<table>); InputError when the run made none."""
    from tasks.config import load_config
    from tasks.core.errors import InputError

    root = params.resolve().parent
    cfg = load_config(params)
    outputs = _outputs(run_name)
    path = root / outputs.report_dir() / table
    if not path.is_file():
        raise InputError(f"{path}: not found; run `edgeopt run` first ({why})")
    return root, cfg, outputs, path


def _outputs(run_name: str | None):
    from tasks.core.catalog import MAIN, run_catalog

    return MAIN if run_name is None else run_catalog(_folder_name(run_name, "--run"))


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Known errors become one line and exit code 1; anything else keeps its traceback."""
    try:
        yield
    except EdgeoptError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
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


def _num(value, fmt: str) -> str:
    return "" if value is None or value != value else format(value, fmt)  # value != value: NaN


def _rows_table(rows: list[dict]) -> Table:
    quick = any(r.get("quick") for r in rows)
    title = "benchmark (metrics/benchmark.csv)" + ("  [QUICK MODE: not for decisions]" if quick else "")
    table = Table(title=title, caption="(sim) = HTP simulator time, not device latency" if any(
        r.get("simulated") for r in rows) else None)
    from tasks.data.evaluation import metric_label

    metric = metric_label(rows[0]["eval_set"], rows[0]["metric_name"]) if rows else "metric"
    columns = ("model", "variant", "device", "target", "seq_len", "size MB", "p50 ms", "p99 ms", "p50 spread %",
               "cold ms", "warm ms", metric, "drop", "in budget", "cos→fp32 min")
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "variant", "device", "target") else "right")
    for r in rows:
        sim = " (sim)" if r.get("simulated") else ""
        spread = _num(r.get("latency_p50_spread_pct"), ".1f")
        if spread and not r.get("latency_stable"):
            spread = f"[red]{spread}[/]"
        table.add_row(
            r["model"], r["variant"], r["device"], r["target"], str(r["seq_len"]), f"{r['size_mb']:.1f}",
            f"{r['latency_p50_ms']:.2f}{sim}", f"{r['latency_p99_ms']:.2f}{sim}", spread,
            f"{r['cold_start_ms']:.0f}", _num(r.get("warm_start_ms"), ".0f"), f"{r['metric_value']:.2f}",
            f"{r['metric_drop']:+.2f}", "[green]yes[/]" if r["within_budget"] else "[red]no[/]",
            f"{r['cosine_to_fp32_min']:.5f}",
        )
    return table


def _choice_table(choice: dict) -> Table:
    table = Table(title=f"sequence length per device (keep {choice['coverage']:.0%} of inputs whole; "
                        "reasons in the report)")
    for col in ("device/target", "length", "inputs kept", "deploy", "p50 ms", "vs longest measured"):
        table.add_column(col, overflow="fold")
    for key, c in sorted(choice["choice"].items()):
        longer = "" if c["longest_seq_len"] == c["seq_len"] else f"{c['speedup_vs_longest']:.1f}x faster than {c['longest_seq_len']}"
        table.add_row(key, str(c["seq_len"]), f"{c['covered_share']:.1%}", f"{c['model']}/{c['variant']}",
                      f"{c['latency_p50_ms']:.2f}" + (" (sim)" if c["simulated"] else ""), longer)
    return table


def _compile_table(rows: list[dict]) -> Table:
    table = Table(title="compile (metrics/compile.csv); simulated timings are not device latency")
    for col in ("variant", "device", "target", "seq_len", "status", "NPU nodes", "CPU fallback", "compile s",
                "cos→source min", "run ms"):
        table.add_column(col)

    num = _num
    for r in rows:
        run_ms = num(r["verify_run_ms_median"], ".1f") + (" (simulated)" if r["simulated"] and r["verify_run_ms_median"] else "")
        table.add_row(
            r["variant"], r["device"], r["target"], str(r["seq_len"]), r["status"], num(r["npu_nodes"], "d"),
            num(r["cpu_fallback_nodes"], "d"), num(r["compile_s"], ".1f"), num(r["verify_min_cosine"], ".5f"), run_ms,
        )
    return table


T = TypeVar("T")


@contextlib.contextmanager
def _interrupts_end_the_run_quietly() -> Iterator[None]:
    """Ctrl-C and SIGTERM (`kill PID`, a service manager's stop) end a run with one line. A terminal's Ctrl-C
    reaches every process of the run's group; a SIGTERM reaches this one only, so it is passed on to the
    processes this run started in its own session (benchmark workers, a recipe's process pool: the run's Prefect
    server has a session of its own and is stopped by `services.run_api`), and the main thread unwinds through
    the same cleanup. Logging stops first: the flow thread would otherwise log each stopped child's failure
    (`BrokenProcessPool`, a worker's exit code) with its traceback before the process exits."""

    def stop(signum: int, frame: Any) -> None:
        import psutil

        logging.disable(logging.CRITICAL)
        if signum == signal.SIGTERM:
            session = os.getsid(0)
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error, OSError):
                    if os.getsid(child.pid) == session:
                        child.terminate()
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, stop)
    if previous[signal.SIGINT] is signal.default_int_handler:  # a run started with SIGINT ignored keeps ignoring it
        signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _off_main_thread(fn: Callable[[], T]) -> T:
    """`fn()` run in a thread of its own while this (main) thread waits for it, so that a Ctrl-C is raised here,
    in plain Python, and never inside a stage's native code: a KeyboardInterrupt raised while a C extension
    initialises (`import onnx` in the export stage) crashes the process with SIGSEGV."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread, which raises it
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="edgeopt-flow", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="few timed runs and an evaluation subset (benchmark.quick); rows are marked quick, dvc.lock is left alone"
    )] = False,
) -> None:
    """Run the whole pipeline as a Prefect flow; unchanged stages are skipped (cached)."""
    with _user_errors():
        from flows import services, stages, tracking
        from flows.locking import run_scratch
        from tasks.config import load_config
        from tasks.core.errors import StageError

        root = params.resolve().parent
        overrides = {"benchmark": {"quick": True}} if quick else None
        try:
            # The run owns its temp folder and its Prefect server: a Ctrl-C, or a kill, leaves neither behind. The
            # server takes ~7 s to start: the checks and the flow's modules load meanwhile.
            with _interrupts_end_the_run_quietly(), run_scratch(root), services.run_api(root) as api_ready:
                with contextlib.chdir(root):  # params paths are relative to the project root
                    cfg = load_config(params, overrides)
                    stages.preflight(cfg)  # validated before any stage starts
                    tracking.check_uri(tracking.tracking_uri(cfg, root))
                # And the MLflow client and local store the flow's last step opens (2.5 s of imports).
                for module in ("mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store"):
                    importlib.import_module(module)
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker
                from prefect.settings import PREFECT_API_URL, temporary_settings

                from flows.pipeline import USER_ERROR, pipeline

                api = api_ready()

                def flow_run():
                    with temporary_settings({PREFECT_API_URL: api}):
                        flow_state = pipeline(project_dir=str(root), params_file=params.name, overrides=overrides,
                                              return_state=True)
                        # The run's logs and events reach its server before the server stops.
                        APILogWorker.drain_all(timeout=10)
                        EventsWorker.drain_all(timeout=10)
                    return flow_state

                state = _off_main_thread(flow_run)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted:[/] finished stages are kept; `edgeopt run` continues from them")
            sys.stdout.flush()
            sys.stderr.flush()
            # Not a normal exit: Prefect's exit hooks would wait, without end, to send the interrupted run's last
            # logs and events to its server, which has already stopped. Our own cleanup is done (the `with` above).
            os._exit(130)
        if state.name == USER_ERROR:
            raise StageError(state.message)
        result = state.result()
    states = Table(title="stages")
    states.add_column("stage")
    states.add_column("state")
    for name, stage_state in result["stages"].items():
        states.add_row(name, f"[green]{stage_state}[/]" if stage_state in ("Cached", "Linked") else stage_state)
    console.print(states)
    console.print(_rows_table(result["rows"]))
    if result["compile_rows"]:
        console.print(_compile_table(result["compile_rows"]))
    console.print(_choice_table(result["seq_len_choice"]))
    if result.get("mlflow_fallback_reason"):
        err_console.print(f"[yellow]warning:[/] {escape(result['mlflow_fallback_reason'])}")
    console.print(f"outputs: {result['outputs']}" + ("" if result["dvc_synced"] else " (a run folder: dvc.lock untouched)"))
    console.print(f"report: {result['report_files'][0]}")
    console.print(f"MLflow parent run {result['mlflow_run_id']}: {result['mlflow_run_url']}"
                  + ("" if tracking.is_server(result["mlflow_tracking_uri"]) else " (`edgeopt ui` serves it)"), soft_wrap=True)
    console.print(f"all runs with their headline metrics: {result['mlflow_view_url']}", soft_wrap=True)


def _target(cfg, variant: str, device: str):
    """(index, target) of the params.yaml target with this variant and device."""
    from tasks.core.errors import ConfigError

    for index, target in enumerate(cfg.targets):
        if (target.variant, target.device) == (variant, device):
            return index, target
    raise ConfigError(f"no target {{variant: {variant}, device: {device}}} in params.yaml targets")


def _job(cfg, variant: str, device: str, target: str):
    from tasks.core.errors import ConfigError

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
    variant: Annotated[str | None, typer.Option(help="for quantize, sensitivity, benchmark and bundle")] = None,
    device: Annotated[str | None, typer.Option(help="for benchmark, bundle and compile: a device")] = None,
    target: Annotated[str | None, typer.Option(help="for compile: a job's target (e.g. a QNN SoC)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run one stage instance: the `cmd` of each stage in dvc.yaml."""
    with _user_errors():
        from flows import stages
        from flows.caching import record_result
        from tasks.config import load_config
        from tasks.core.errors import ConfigError

        cfg = load_config(params)
        with contextlib.chdir(params.resolve().parent):
            stages.preflight(cfg)
        from flows import dvc_yaml

        dvc_yaml.check(cfg, params.resolve().parent)
        needed = {
            "export_onnx": ("seq_len",),
            "reference": ("seq_len",),
            "graph_surgery": ("seq_len",),
            "quantize": ("variant", "seq_len"),
            "sensitivity": ("variant",),
            "benchmark": ("variant", "device", "seq_len"),
            "bundle": ("variant", "device"),
            "compile": ("variant", "device", "target", "seq_len"),
        }.get(name, ())
        given = {"seq_len": seq_len, "variant": variant, "device": device, "target": target}
        missing = [f"--{k.replace('_', '-')}" for k in needed if given[k] is None]
        if missing:
            raise ConfigError(f"stage {name} needs {' '.join(missing)}")
        builders = {
            "fetch_model": lambda: stages.fetch_model(cfg),
            "prune": lambda: stages.prune(cfg, model),
            "export_onnx": lambda: stages.export_onnx(cfg, model, seq_len),
            "reference": lambda: stages.reference(cfg, seq_len),
            "calibration_data": lambda: stages.calibration_data(cfg),
            "graph_surgery": lambda: stages.graph_surgery(cfg, model, seq_len),
            "quantize": lambda: stages.quantize(cfg, model, variant, seq_len),
            "benchmark": lambda: stages.benchmark(cfg, model, *_target(cfg, variant, device), seq_len),
            "compile": lambda: stages.compile_device(cfg, model, *_job(cfg, variant, device, target), seq_len),
            "bundle": lambda: stages.bundle(cfg, model, *_target(cfg, variant, device)),
            "race": lambda: stages.race(cfg),
            "latency_curve": lambda: stages.latency_curve(cfg, model),
            "sensitivity": lambda: stages.sensitivity(cfg, model, variant),
            "report": lambda: stages.report(cfg),
        }
        if name not in builders:
            raise ConfigError(f"unknown stage {name!r}; known: {', '.join(builders)}")
        # Only instances dvc.yaml knows: anything else would write an output no stage declares.
        if model not in cfg.models:
            raise ConfigError(f"--model {model}: not in params.yaml models {cfg.models}")
        if seq_len is not None and seq_len not in cfg.seq_lens:
            raise ConfigError(f"--seq-len {seq_len}: not in params.yaml seq_lens {cfg.seq_lens}")
        if name == "quantize" and variant not in cfg.variants:
            raise ConfigError(f"--variant {variant}: not in params.yaml variants {cfg.variants}")
        if name == "sensitivity" and (variant not in cfg.sensitivity.variants or model not in cfg.sensitivity.models):
            raise ConfigError(f"sensitivity --model {model} --variant {variant}: not in params.yaml sensitivity.models "
                              f"{cfg.sensitivity.models} x sensitivity.variants {cfg.sensitivity.variants}")
        from flows.locking import run_scratch, workspace_lock

        call = builders[name]()
        # `dvc repro` holds DVC's own lock; this one keeps a concurrent `edgeopt run` out. The scratch folder, like
        # a run's, is reaped by the next command when this one is killed.
        with run_scratch(params.resolve().parent), workspace_lock(params.resolve().parent, on_wait=err_console.print):
            result = call.execute()
            record_result(call, result, root=params.resolve().parent)
    console.print(f"{call.name}: done")


def _records(frame) -> list[dict]:
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _brief_table(bench, metric: str) -> str:
    """One row per (model, variant, device, target): p50, speed-up over dense ORT fp32 and the metric at each length."""
    import pandas as pd

    key = ["model", "variant", "device", "target"]
    bench = bench.assign(speedup=[f"{v:.2f}" for v in bench["speedup"]],
                         metric_value=[f"{v:.2f}" for v in bench["metric_value"]],
                         within_budget=bench["within_budget"].map({True: "yes", False: "no"}))
    wide = bench.pivot_table(index=key, columns="seq_len", aggfunc="first", sort=False,
                             values=["latency_p50_ms", "speedup", "metric_value", "within_budget"])
    labels = {"latency_p50_ms": "p50 ms", "speedup": "× ORT fp32", "metric_value": metric, "within_budget": "in budget"}
    lengths = sorted(bench["seq_len"].unique())
    columns = [(value, length) for value in labels for length in lengths]
    table = pd.DataFrame({f"{labels[value]} @{length}": wide[(value, length)] for value, length in columns})
    table = table.reset_index()
    # Unpadded cells: the table is pasted into the README, which renders it and stays short.
    lines = [list(table.columns), ["---"] * len(table.columns), *table.astype(str).to_numpy().tolist()]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


@app.command()
def results(
    markdown: Annotated[bool, typer.Option(help="print Markdown tables (every row; docs/benchmarks.md)")] = False,
    brief: Annotated[bool, typer.Option(help="with --markdown: one row per artifact, its lengths side by side "
                                             "(the README's table)")] = False,
    project: Annotated[Path, typer.Option(help="project root")] = Path("."),
    run_name: RunOpt = None,
) -> None:
    """Show the last run's metrics/benchmark.csv, metrics/compile.csv, the seq-len choice and the shape choice."""
    with _user_errors():
        import json

        import pandas as pd

        from tasks.core.errors import InputError
        from tasks.core.schemas import COMPILE_ROWS, REPORT_ROWS
        from tasks.data.evaluation import metric_label

        schemas = {"benchmark.csv": REPORT_ROWS, "compile.csv": COMPILE_ROWS}
        tables = {}
        for name in ("benchmark.csv", "compile.csv", "summary.json"):
            path = project / _outputs(run_name).report_dir() / name
            if not path.is_file():
                raise InputError(f"{path}: not found; run `edgeopt run` (or `dvc repro`) first")
            tables[name] = json.loads(path.read_text()) if name.endswith(".json") else pd.read_csv(path)
            missing = [c for c in schemas[name].columns if c not in tables[name].columns] if name in schemas else []
            if missing:
                raise InputError(f"{path}: no column {', '.join(missing[:3])} (written by an older edgeopt); "
                                 "rerun `edgeopt run` to rewrite it")
    if not markdown:
        console.print(_rows_table(_records(tables["benchmark.csv"])))
        console.print(_compile_table(_records(tables["compile.csv"])))
        if "seq_len_choice" in tables["summary.json"]:
            console.print(_choice_table(tables["summary.json"]["seq_len_choice"]))
        for key, pick in sorted(tables["summary.json"].get("shape_choice", {}).items()):
            console.print(f"on your inputs, {key}: {pick['model']}/{pick['variant']} {pick['policy']} {pick['shapes']}, "
                          f"mean {pick['latency_mix_mean_ms']:.2f} ms (p99 {pick['latency_mix_p99_ms']:.2f}): "
                          f"{pick['reason']}")
        return
    bench = tables["benchmark.csv"]
    fp32 = bench[(bench["variant"] == "fp32") & (bench["device"] == "ort_cpu") & (bench["model"] == "dense")]
    fp32 = fp32.set_index("seq_len")["latency_p50_ms"]
    bench = bench.assign(
        speedup=fp32.reindex(bench["seq_len"]).to_numpy() / bench["latency_p50_ms"],
        latency_p50_ms=[f"{v:.2f}{' (sim)' if s else ''}" for v, s in zip(bench["latency_p50_ms"], bench["simulated"])],
    )
    metric = metric_label(bench["eval_set"].iloc[0], bench["metric_name"].iloc[0])
    if brief:
        print(_brief_table(bench, metric))
        return
    columns = {"model": "model", "variant": "variant", "device": "device", "target": "target", "seq_len": "L",
               "precision": "precision", "size_mb": "MB", "latency_p50_ms": "p50 ms", "latency_p99_ms": "p99 ms",
               "latency_p50_spread_pct": "p50 spread %", "speedup": "× ORT fp32",
               "metric_value": metric,
               "metric_drop": "drop", "within_budget": "in budget", "cosine_to_fp32_min": "cos→fp32 min"}
    print(bench[list(columns)].rename(columns=columns).to_markdown(index=False, floatfmt=".2f"))
    print()
    compiled = tables["compile.csv"]
    formats = {"npu_nodes": ".0f", "cpu_fallback_nodes": ".0f", "compile_s": ".2f", "cached_compile_s": ".2f",
               "verify_min_cosine": ".5f", "verify_run_ms_median": ".0f"}
    compiled = compiled.assign(**{
        column: ["" if pd.isna(v) else format(v, spec) for v in compiled[column]] for column, spec in formats.items()
    })
    compiled["verify_run_ms_median"] += [" (sim)" if s and v else "" for v, s in
                                         zip(compiled["verify_run_ms_median"], compiled["simulated"])]
    columns = {"model": "model", "variant": "variant", "device": "device", "target": "target", "seq_len": "L",
               "status": "status", "npu_nodes": "NPU nodes", "cpu_fallback_nodes": "CPU fallback",
               "compile_s": "compile s", "cached_compile_s": "cached s", "verify_min_cosine": "cos→source min",
               "verify_run_ms_median": "run ms"}
    print(compiled[list(columns)].rename(columns=columns).to_markdown(index=False, disable_numparse=True))


@app.command()
def report(
    params: ParamsOpt = Path("params.yaml"),
    name: Annotated[str | None, typer.Option(help="folder under reports/ (default: a timestamp)")] = None,
    run_name: RunOpt = None,
) -> None:
    """Rebuild the HTML + Markdown report (reports/<name>/) from metrics/ of the last run."""
    with _user_errors():
        from flows import dashboard
        from tasks.config import load_config

        root = params.resolve().parent
        cfg = load_config(params)
        outputs = _outputs(run_name)
        folder = root / outputs.reports_dir() / _folder_name(name or dashboard.run_name(), "--name")
        files = dashboard.write_report(root / outputs.report_dir(), folder, cfg.report.accuracy_budget,
                                       plot_cache=root / dashboard.PLOT_CACHE)
    console.print(f"report: {files[0]}")


def _value(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="MLflow parent run id (the baseline)")],
    run_b: Annotated[str, typer.Argument(help="MLflow parent run id (compared to the baseline)")],
    params: ParamsOpt = Path("params.yaml"),
    markdown: Annotated[bool, typer.Option("--markdown", help="Markdown tables")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """What differs between two pipeline runs: their settings, then each artifact's metrics (B - A), with a
    latency change inside the rows' measured p50 spread called "within noise"."""
    with _user_errors():
        import json

        from flows.compare import compare as compare_runs
        from flows.tracking import tracking_uri
        from tasks.config import load_config

        cfg = load_config(params)
        result = compare_runs(tracking_uri(cfg, params.resolve().parent), run_a, run_b)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    changes = [c for c in result["changes"] if c["verdict"] != "same"]
    if markdown:
        print(f"B `{result['b']['name']}` vs A `{result['a']['name']}` ({result['tracking_uri']})\n")
        print("| setting | A | B |\n|---|---|---|")
        for p in result["params"]:
            print(f"| {p['param']} | {p['a']} | {p['b']} |")
        print("\n| artifact | metric | A | B | change | verdict |\n|---|---|---|---|---|---|")
        for c in changes:
            pct = "" if c["change_pct"] is None else f"{c['change_pct']:+.1f} %"
            print(f"| {c['row']} | {c['metric']} | {_value(c['a'])} | {_value(c['b'])} | {pct} | {c['verdict']} |")
        print(f"\nSide by side in MLflow: {result['compare_url']}")
        return
    # Narrow: one block per artifact, readable at 80 columns.
    console.print(f"B [bold]{result['b']['name']}[/] ({run_b[:8]})\nvs A [bold]{result['a']['name']}[/] ({run_a[:8]})",
                  highlight=False)
    console.print(f"in {result['tracking_uri']}", style="dim", highlight=False)
    console.print("\n[bold]settings that differ[/]" if result["params"] else "\nsettings: the same")
    for p in result["params"]:
        console.print(f"  {p['param']}: {p['a']} -> {p['b']}", highlight=False)
    colours = {"better": "green", "worse": "red"}
    row = None
    for c in changes:
        if c["row"] != row:
            row = c["row"]
            console.print(f"\n[bold]{row}[/]", highlight=False)
        pct = "" if c["change_pct"] is None else f"{c['change_pct']:+.1f}%"
        verdict = c["verdict"]
        colour = colours.get(verdict, "dim")
        console.print(f"  {c['metric']:<19} {_value(c['a']):>9} -> {_value(c['b']):<9} {pct:>8}  [{colour}]{verdict}[/]",
                      highlight=False)
    if not changes:
        console.print("\nmetrics: the same for every artifact in both runs")
    for label, names in (("only in A", result["only_in_a"]), ("only in B", result["only_in_b"])):
        if names:
            console.print(f"{label}: " + ", ".join(names), highlight=False)
    console.print(f"\nside by side in MLflow: {result['compare_url']}", highlight=False, soft_wrap=True)


_ARM = re.compile(r"(?P<model>[^/@]+)/(?P<variant>[^/@]+)(@(?P<device>[^/@]+)(/(?P<target>[^/@]+))?)?")


def _arm(spec: str, bench, root: Path, seq_len: int):
    """An artifact named `MODEL/VARIANT[@DEVICE[/TARGET]]`, found among the run's benchmark rows."""
    from tasks.backends.interleave import Arm
    from tasks.core.errors import ConfigError

    match = _ARM.fullmatch(spec)
    if not match:
        raise ConfigError(f"{spec!r}: name an artifact as MODEL/VARIANT[@DEVICE[/TARGET]], e.g. pruned/fp32@ort_cpu")
    want = {"model": match["model"], "variant": match["variant"], "device": match["device"] or "ort_cpu",
            "target": match["target"] or "host", "seq_len": seq_len}
    rows = bench
    for column, value in want.items():
        rows = rows[rows[column] == value]
    if rows.empty:
        known = sorted({f"{r.model}/{r.variant}@{r.device}/{r.target}" for r in bench[bench["seq_len"] == seq_len].itertuples()})
        raise ConfigError(f"{spec}: no benchmark row for it at --seq-len {seq_len}; the run has {', '.join(known)}")
    row = rows.iloc[0]
    if bool(row["simulated"]):
        raise ConfigError(f"{spec}: runs on a simulator, whose timings are not device latency; pick a real device")
    label = f"{want['model']}/{want['variant']}@{want['device']}" + ("" if want["target"] == "host" else f"/{want['target']}")
    return Arm(label, want["device"], root / row["artifact"])


@app.command()
def speedup(
    arms: Annotated[list[str], typer.Argument(help="artifacts as MODEL/VARIANT, MODEL/VARIANT@DEVICE or "
                                                   "MODEL/VARIANT@DEVICE/TARGET (device ort_cpu, target host by "
                                                   "default); the first is the baseline")],
    seq_len: Annotated[int, typer.Option(help="the length whose artifacts are timed")] = 128,
    rounds: Annotated[int, typer.Option(min=2, help="rounds; each times every artifact once, order reversed "
                                                    "every round")] = 6,
    csv: Annotated[Path | None, typer.Option(help="also write one row per round and artifact here")] = None,
    params: ParamsOpt = Path("params.yaml"),
    run_name: RunOpt = None,
) -> None:
    """Speed-ups measured interleaved: benchmarked artifacts of the last run timed in alternating worker
    processes of this one command (threads, warm-up and timed runs from params.yaml's benchmark), so a ratio
    never compares measurements from two runs."""
    with _user_errors():
        import tempfile

        import numpy as np
        import pandas as pd
        from rich.progress import Progress

        from flows.locking import run_scratch
        from tasks.backends.interleave import speedups, time_interleaved
        from tasks.backends.measure import WorkerPool
        from tasks.builders.calibration import calib_name
        from tasks.core.errors import ConfigError, InputError

        root, cfg, outputs, bench_path = _run_output(params, run_name, "benchmark.csv", "speedup times its artifacts")
        if len(arms) < 2:
            raise ConfigError("name at least two artifacts: the baseline first, then what to compare with it")
        bench = pd.read_csv(bench_path)
        chosen = [_arm(spec, bench, root, seq_len) for spec in arms]
        feeds_path = root / outputs.calibration_data_dir() / calib_name(seq_len)
        if not feeds_path.is_file():
            raise InputError(f"{feeds_path}: not found; run the calibration_data stage (it holds the timing input)")
        with np.load(feeds_path) as npz:
            feeds = {name: npz[name][:1] for name in npz.files}
        timing = cfg.benchmark
        with (run_scratch(root), tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp,
              Progress(console=err_console) as progress):
            task = progress.add_task(f"{rounds} rounds x {len(chosen)} artifacts", total=rounds * len(chosen))
            pool = WorkerPool(Path(tmp), feeds, timing.threads, timing.worker_timeout_s)
            rows = time_interleaved(pool, chosen, rounds=rounds, warmup=timing.warmup_runs, timed=timing.timed_runs,
                                    on_measured=lambda *_: progress.advance(task))
    summary = speedups(rows, chosen[0].label)
    if csv:
        tmp_csv = csv.with_name(csv.name + ".tmp")
        pd.DataFrame(rows).to_csv(tmp_csv, index=False)
        tmp_csv.replace(csv)
    table = Table(title=f"L={seq_len}, {timing.threads} threads, {rounds} interleaved rounds of "
                        f"{timing.timed_runs} timed runs; speed-up over {chosen[0].label}")
    for column in ("artifact", "p50 ms (median of rounds)", "p50 range", "speed-up", "speed-up range"):
        table.add_column(column, justify="left" if column == "artifact" else "right", overflow="fold")
    for s in summary:
        table.add_row(s["arm"], f"{s['latency_p50_ms_median']:.2f}",
                      f"{s['latency_p50_ms_min']:.2f}-{s['latency_p50_ms_max']:.2f}", f"{s['speedup_median']:.2f}x",
                      f"{s['speedup_min']:.2f}-{s['speedup_max']:.2f}x")
    console.print(table)
    console.print(f"CPU: {rows[0]['cpu_model']} ({rows[0]['cpu_flags']})", highlight=False)


@app.command()
def peers(
    peers_dir: Annotated[Path, typer.Option("--peers", help="peer exports, one folder with a peer.json each "
                                                          "(infra/peers/README.md builds them)")] = Path("artifacts/peers"),
    rounds: Annotated[int, typer.Option(min=1, help="rounds; each runs every engine's process once, order "
                                                    "reversed every round")] = 2,
    max_tokens: Annotated[int | None, typer.Option(min=3, help="truncate the peers' inputs here (default: where "
                                                               "the run's choice truncates)")] = None,
    out: Annotated[Path, typer.Option(help="folder for peers.csv, peers-rounds.csv, peers.md, peers.svg")] = Path(
        "reports/peers"),
    params: ParamsOpt = Path("params.yaml"),
    run_name: RunOpt = None,
) -> None:
    """The run's recommended deployment per CPU engine against other tools' exports of the same model, on the
    same inputs and threads, interleaved (flows/peers.py)."""
    with _user_errors():
        import json

        from rich.progress import Progress

        from flows import peers as peer_compare
        from flows.locking import run_scratch

        root, cfg, outputs, summary_path = _run_output(params, run_name, "summary.json", "peers compares its choice")
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        with run_scratch(root), Progress(console=err_console, transient=True) as progress:
            task = progress.add_task(f"{rounds} rounds of each engine's process", total=None)
            table, metrics, folder = peer_compare.run(
                cfg, root, outputs, summary, peers_dir, rounds=rounds, max_tokens=max_tokens, out=out,
                on_round=lambda: progress.advance(task))
    shown = Table(title=f"Your recommended deployment vs peer exports ({rounds} rounds, {cfg.benchmark.threads} threads)")
    for column in ("artifact", "device", "mean ms", "p99 ms", *metrics, "vs fastest int8 peer, same engine",
                   "any engine"):
        shown.add_column(column, justify="left" if column in ("artifact", "device") else "right", overflow="fold")
    for r in table.sort_values(["device", "latency_mean_ms"]).to_dict("records"):
        shown.add_row(r["artifact"], r["device"], f"{r['latency_mean_ms']:.2f}", f"{r['latency_p99_ms']:.2f}",
                      *(f"{r[m]:.2f}" for m in metrics), f"{r['speedup_vs_same_engine_int8_peer']:.2f}x",
                      f"{r['speedup_vs_fastest_int8_peer']:.2f}x")
    console.print(shown)
    console.print(f"CPU: {table['cpu_model'].iloc[0]} ({table['cpu_flags'].iloc[0]}); written to {folder}", highlight=False)


@app.command("dvc-yaml")
def dvc_yaml_command(
    params: ParamsOpt = Path("params.yaml"),
    check: Annotated[bool, typer.Option("--check", help="only say whether dvc.yaml is current (exit 1 if not)")] = False,
) -> None:
    """Write dvc.yaml from params.yaml and the stages' imports (what `dvc repro` runs)."""
    with _user_errors():
        from flows import dvc_yaml
        from tasks.config import load_config

        cfg = load_config(params)
        root = params.resolve().parent
        if check:
            dvc_yaml.check(cfg, root)
            console.print(f"{root / dvc_yaml.DVC_YAML}: current")
            return
        path = dvc_yaml.write(cfg, root)
    console.print(f"wrote {path}")


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


services_app = typer.Typer(
    no_args_is_help=True, help="Local MLflow server, Prefect server and Prefect worker (infra/README.md)."
)
app.add_typer(services_app, name="services")
ServiceNames = Annotated[
    list[str] | None, typer.Argument(help="mlflow, prefect-server, prefect-worker (default: all)", show_default=False)
]
ProjectOpt = Annotated[Path, typer.Option("--project", help="project root; service state in .edgeopt/services/")]


@services_app.command("start")
def services_start(
    names: ServiceNames = None,
    project: ProjectOpt = Path("."),
    host: Annotated[str | None, typer.Option(help="interface to bind (default loopback)")] = None,
    prefect_port: Annotated[int | None, typer.Option(min=1, max=65535)] = None,
    mlflow_port: Annotated[int | None, typer.Option(min=1, max=65535)] = None,
    work_pool: Annotated[str | None, typer.Option(help="process work pool")] = None,
    worker_poll: Annotated[float | None, typer.Option(min=0.1, help="seconds between the worker's polls")] = None,
    timeout: Annotated[float | None, typer.Option(min=0.1, help="seconds to wait for each service")] = None,
) -> None:
    """Start the services (all by default) and wait until each answers its health check. Unset options
    take ServicesParams' defaults (flows/services.py, infra/README.md)."""
    with _user_errors():
        from flows.services import ServicesParams, start, state_dir

        given = {"host": host, "prefect_port": prefect_port, "mlflow_port": mlflow_port, "work_pool": work_pool,
                 "worker_poll_s": worker_poll, "start_timeout_s": timeout}
        params = ServicesParams(**{k: v for k, v in given.items() if v is not None})
        if params.host not in ("127.0.0.1", "localhost", "::1"):
            err_console.print(f"[yellow]warning:[/] binding {params.host}: reachable from the network, no authentication")
        urls = start(project.resolve(), params, names or ())
    for name, url in urls.items():
        console.print(f"{name}: {url}")
    console.print(f"clients: source {state_dir(project.resolve()) / 'env.sh'}")


@services_app.command("stop")
def services_stop(names: ServiceNames = None, project: ProjectOpt = Path(".")) -> None:
    """Stop the services (all by default) and every process they started."""
    with _user_errors():
        from flows.services import stop

        stopped = stop(project.resolve(), names or ())
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@services_app.command("status")
def services_status(project: ProjectOpt = Path(".")) -> None:
    """Show each service's pid, health, URL and log; exit 1 if any is down."""
    with _user_errors():
        from flows.services import status

        states = status(project.resolve())
    table = Table(title="services")
    for col in ("service", "pid", "state", "url", "log"):
        table.add_column(col)
    for s in states:
        state = "[green]healthy[/]" if s.healthy else ("[red]not answering[/]" if s.pid else "stopped")
        table.add_row(s.name, str(s.pid or ""), state, s.url, str(s.log))
    console.print(table)
    raise typer.Exit(0 if all(s.healthy for s in states) else 1)


@services_app.command("env")
def services_env(project: ProjectOpt = Path(".")) -> None:
    """Print `export` lines for clients of the running services: eval "$(edgeopt services env)"."""
    with _user_errors():
        from flows.services import client_env

        env = client_env(project.resolve())
    for key, value in env.items():
        print(f"export {key}={value}")


@app.command()
def deploy(
    names: Annotated[list[str] | None, typer.Argument(help="deployments in prefect.yaml (default: all)",
                                                      show_default=False)] = None,
    project: ProjectOpt = Path("."),
    prefect_file: Annotated[Path | None, typer.Option(help="[default: <project>/prefect.yaml]")] = None,
    api_url: Annotated[str | None, typer.Option(help="[default: $PREFECT_API_URL or `edgeopt services`]")] = None,
) -> None:
    """Validate prefect.yaml's deployments against params.yaml, then create them on the Prefect server."""
    with _user_errors():
        from flows.deploy import deploy as deploy_all
        from flows.services import prefect_api_url

        root = project.resolve()
        url = api_url.rstrip("/") if api_url else prefect_api_url(root)
        created = deploy_all(root, url, prefect_file or root / "prefect.yaml", names or None)
    for d in created:
        console.print(f"{d['name']}: cron {', '.join(d['crons']) or 'none'} on work pool {d['work_pool']} ({url})")


def main() -> None:
    try:
        app()
    finally:
        # What ~3,000 loaded modules allocated is left to the process exit instead of the interpreter's final
        # collections: 1.6 s off every command that ran the pipeline's imports. Nothing of edgeopt's relies on
        # the collector to finish (outputs are closed and renamed into place, logs flushed by atexit).
        gc.freeze()


if __name__ == "__main__":
    main()
