"""Peer comparison: what a run recommends per CPU engine against other tools' exports of the same model.

A CPU user could take sentence-transformers' ONNX or OpenVINO export, or Olive's, instead of edgeopt's artifact.
`edgeopt peers` answers whether they should, on this machine: each engine's deployments chosen by the run (one
per compile target, e.g. f32 and bf16: `summary.json` -> `shape_choice`, each bundle as deployed: buckets, dynamic
or one static length) and every peer
export of that engine (a folder per export with a `peer.json`: `infra/peers/` builds them) run the same inputs
(every evaluation set's; latency over the first set's), interleaved input by input in one worker process per
engine (engines sharing a process skew each other), on the benchmark's threads. Peer exports are fed each input
unpadded at its own length and pooled as their users do. The engines' processes alternate over `rounds`, so a
ratio across engines compares measurements of the same round. Accuracy: every evaluation set, scored on the
outputs of the timed runs.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.errors
from pydantic import ValidationError

from tasks.backends.worker import launch_worker
from tasks.config import EdgeoptConfig
from tasks.core import catalog
from tasks.core.catalog import Catalog
from tasks.core.errors import InputError
from tasks.core.machine import host_cpu
from tasks.core.params import StrictParams
from tasks.core.schemas import DYNAMIC, PEER_ROWS, STATIC
from tasks.data import evaluation
from tasks.runtime import peer_worker
from tasks.runtime.bundle import read_manifest
from tasks.stages.bundle import HOST

PEER_FILE = "peer.json"
ENGINE_DEVICES = {"onnxruntime": "ort_cpu", "openvino": "openvino_cpu"}
EDGEOPT = "edgeopt"


class PeerTool(StrictParams, extra="ignore"):
    name: str
    version: str


class PeerSpec(StrictParams, extra="ignore"):
    """The part of a `peer.json` this comparison reads (infra/peers/build_peers.py writes the rest: inputs, calls,
    calibration)."""

    name: str
    tool: PeerTool
    engine: str
    model_file: str
    precision: str
    pooling: dict
    outputs: list[dict] = []
    output_to_use: str | None = None


@dataclass(frozen=True)
class Peer:
    name: str
    tool: str
    device: str
    artifact: Path
    pooling: str | None
    precision: str

    @property
    def int8(self) -> bool:
        return self.precision.startswith("int8")


def read_peers(folder: Path) -> list[Peer]:
    """Every export under `folder` (one sub-folder with a peer.json each); InputError naming a bad one."""
    files = sorted(Path(folder).glob(f"*/{PEER_FILE}"))
    if not files:
        raise InputError(f"{folder}: no */{PEER_FILE}; build the peer exports first (infra/peers/README.md)")
    peers = []
    for path in files:
        try:
            spec = PeerSpec.model_validate_json(path.read_text(encoding="utf-8"))
        except (ValidationError, ValueError) as exc:
            raise InputError(f"{path}: not a peer description ({str(exc).splitlines()[-1].strip()})") from None
        if spec.engine not in ENGINE_DEVICES:
            raise InputError(f"{path}: engine {spec.engine!r} is none of {sorted(ENGINE_DEVICES)}")
        first = spec.outputs[0].get("name") if spec.outputs else None
        if spec.output_to_use is not None and first is not None and spec.output_to_use != first:
            raise InputError(f"{path}: output_to_use {spec.output_to_use!r} is not the model's first output ({first!r}), "
                             "the one the comparison runs")
        artifact = path.parent / spec.model_file
        if not artifact.is_file():
            raise InputError(f"{path}: model_file {spec.model_file} not found beside it")
        pooling = None if spec.pooling.get("in_graph", True) else "mean"
        peers.append(Peer(spec.name, f"{spec.tool.name} {spec.tool.version}", ENGINE_DEVICES[spec.engine], artifact,
                          pooling, spec.precision))
    return peers


def recommended(summary: dict, outputs: Catalog, device: str) -> list[tuple[dict, int]]:
    """The worker arm of each of the run's choices for `device` (one per compile target, e.g. host and host_bf16:
    its bundle folder and shape policy), fastest on the user's inputs first, with the longest input it takes whole."""
    picks = {k: v for k, v in summary.get("shape_choice", {}).items() if k.split("/", 1)[0] == device}
    if not picks:
        raise InputError(f"summary.json has no shape_choice for {device}; run a job whose targets include {device} "
                         "(e.g. --params params.buckets.yaml)")
    arms = []
    for key, pick in sorted(picks.items(), key=lambda kv: (kv[1]["latency_mix_mean_ms"], kv[0])):
        target = key.split("/", 1)[1]
        folder = outputs.bundle_dir(pick["model"], pick["variant"], device) / target
        read_manifest(folder)  # one line when the bundle is gone
        policy = int(pick["shapes"]) if pick["policy"] == STATIC else "buckets"
        # A dynamic row of a pinned bundle is its artifact at each input's own length, i.e. the bundle loaded unpinned.
        at = "" if target == HOST else f" {target}"
        arms.append(({"label": f"{EDGEOPT} {pick['model']}/{pick['variant']}{at} {pick['policy']} {pick['shapes']}",
                      "bundle": str(folder.resolve()), "policy": policy, "pinned": pick["policy"] != DYNAMIC},
                     max(int(s) for s in pick["shapes"].removeprefix("<=").split("/"))))
    return arms


def compare(arms: dict[str, list[dict]], preprocessor: Path, family: str, scorer: evaluation.Scorer, *, threads: int,
            warmup: int, rounds: int, timeout_s: float, on_round=None) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Time `arms` (device -> worker arms) over the scorer's inputs, one worker process per device, alternating
    over `rounds`. Returns one row per (round, arm) with latency over the first evaluation set's inputs, and each
    arm's outputs (first round) for scoring."""
    timed = int(scorer.offsets[1])
    cpu_model, cpu_flags = host_cpu()
    rows, outputs = [], {}
    devices = list(arms)
    with tempfile.TemporaryDirectory(prefix="edgeopt-peers-") as tmp_name:
        tmp = Path(tmp_name)
        samples = tmp / "samples.json"
        samples.write_text(json.dumps(scorer.inputs), encoding="utf-8")
        for round_no in range(1, rounds + 1):
            for position, device in enumerate(devices if round_no % 2 else devices[::-1], start=1):
                out = tmp / f"out-{round_no}-{device}"
                out.mkdir()
                result = launch_worker(
                    {"arms": arms[device], "preprocessor": str(preprocessor), "family": family, "samples": str(samples),
                     "threads": threads, "warmup_runs": warmup, "outputs": str(out),
                     "cache_dir": str(tmp / f"cache-{device}"), "label": f"round {round_no}/{rounds} {device}",
                     "result": str(tmp / f"result-{round_no}-{device}.json")},
                    timeout_s, module=peer_worker.__name__)
                for a, arm in enumerate(arms[device]):
                    lat = np.asarray(result["latencies_ms"][a][:timed])
                    rows.append({"round": round_no, "position": position, "device": device, "artifact": arm["label"],
                                 "latency_mean_ms": float(lat.mean()), "latency_p50_ms": float(np.percentile(lat, 50)),
                                 "latency_p99_ms": float(np.percentile(lat, 99)), "timed_inputs": timed,
                                 "threads": threads, "engine_version": result["engine_version"],
                                 "cpu_model": cpu_model, "cpu_flags": cpu_flags})
                    if round_no == 1:
                        outputs[arm["label"]] = np.load(out / f"{a}.npy")
                if on_round:
                    on_round()
    return pd.DataFrame(rows), outputs


def summarise(rounds: pd.DataFrame, scores: dict[str, list[dict]], kinds: dict[str, dict]) -> pd.DataFrame:
    """Per artifact: latency (median over rounds of each round's mean), every set's metric, and its speed-up over the
    fastest int8 peer of its own engine (timed in the same process: per round, then the median) and over the
    fastest int8 peer of any engine (other engines run in their own processes)."""
    per_round = rounds.pivot(index="round", columns="artifact", values="latency_mean_ms")
    rows = []
    for label, group in rounds.groupby("artifact", sort=False):
        row = {"artifact": label, **kinds[label], "device": group["device"].iloc[0],
               "latency_mean_ms": float(group["latency_mean_ms"].median()),
               "latency_p50_ms": float(group["latency_p50_ms"].median()),
               "latency_p99_ms": float(group["latency_p99_ms"].median()), "rounds": len(group),
               "threads": int(group["threads"].iloc[0]), "engine_version": group["engine_version"].iloc[0],
               "cpu_model": group["cpu_model"].iloc[0], "cpu_flags": group["cpu_flags"].iloc[0]}
        for s in scores[label]:
            row[f"{s['eval_set']}_{s['metric_name']}"] = s["metric_value"]
        rows.append(row)
    table = pd.DataFrame(rows)
    int8_peers = table[(table["kind"] == "peer") & table["int8"]]
    best = int8_peers.sort_values("latency_mean_ms").iloc[0]["artifact"] if len(int8_peers) else None
    table["speedup_vs_fastest_int8_peer"] = [
        float(np.median(per_round[best] / per_round[label])) if best is not None else np.nan for label in table["artifact"]]
    table["fastest_int8_peer"] = best
    same_engine = {device: group.sort_values("latency_mean_ms")["artifact"].iloc[0]
                   for device, group in int8_peers.groupby("device")}
    table["fastest_int8_peer_same_engine"] = table["device"].map(same_engine)
    table["speedup_vs_same_engine_int8_peer"] = [
        float(np.median(per_round[same_engine[device]] / per_round[label])) if device in same_engine else np.nan
        for label, device in zip(table["artifact"], table["device"], strict=True)]
    try:
        return PEER_ROWS.validate(table)
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        raise InputError(f"peer comparison rows fail {PEER_ROWS.name}: {exc}") from exc


def arms_for(cfg: EdgeoptConfig, outputs: Catalog, peers: list[Peer], summary: dict, max_tokens: int | None
             ) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Device -> worker arms (the run's choices first, one per compile target, then that engine's peer exports,
    truncating inputs where the choices do unless `max_tokens` says otherwise), and each arm's kind."""
    arms, kinds = {}, {}
    for device in sorted({p.device for p in peers}):
        mine = recommended(summary, outputs, device)
        cap = max_tokens or min(longest for _, longest in mine)
        arms[device] = [arm for arm, _ in mine]
        for arm, _ in mine:
            kinds[arm["label"]] = {"kind": EDGEOPT, "tool": EDGEOPT, "int8": False, "precision": ""}
        for peer in (p for p in peers if p.device == device):
            label = f"{peer.name} ({peer.tool})"
            arms[device].append({"label": label, "device": device, "artifact": str(peer.artifact.resolve()),
                                 "pooling": peer.pooling, "max_tokens": cap})
            kinds[label] = {"kind": "peer", "tool": peer.tool, "int8": peer.int8, "precision": peer.precision}
    return arms, kinds


def markdown(table: pd.DataFrame, metric_columns: list[str]) -> str:
    """The summary as a Markdown table, with the machine it was measured on."""
    first = table.iloc[0]
    lines = [f"Measured on {first['cpu_model']} ({first['cpu_flags']}), {first['threads']} threads; mean over the "
             f"first evaluation set's inputs, each engine's artifacts interleaved input by input in one process, "
             f"{int(first['rounds'])} rounds.", "",
             "| artifact | device | mean ms | p99 ms | " + " | ".join(metric_columns)
             + " | vs fastest int8 peer, same engine (same process) | vs fastest int8 peer, any engine |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in metric_columns) + " | --- | --- |"]
    for r in table.sort_values(["device", "latency_mean_ms"]).itertuples():
        metrics = " | ".join(f"{getattr(r, c):.2f}" for c in metric_columns)
        lines.append(f"| {r.artifact} | {r.device} | {r.latency_mean_ms:.2f} | {r.latency_p99_ms:.2f} | {metrics} | "
                     f"{r.speedup_vs_same_engine_int8_peer:.2f}x | {r.speedup_vs_fastest_int8_peer:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, metric: str, path: Path) -> None:
    """Mean latency per artifact (bars, edgeopt's choices in blue) with the first metric beside each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.sort_values("latency_mean_ms")
    fig, ax = plt.subplots(figsize=(9.6, 0.34 * len(rows) + 1.4))
    colors = ["#4c72b0" if k == EDGEOPT else "#8c8c8c" for k in rows["kind"]]
    ax.barh(range(len(rows)), rows["latency_mean_ms"], color=colors)
    for i, r in enumerate(rows.itertuples()):
        ax.text(r.latency_mean_ms, i, f" {r.latency_mean_ms:.2f} ms, {metric} {getattr(r, metric):.2f}", va="center",
                fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{a} [{d}]" for a, d in zip(rows["artifact"], rows["device"])], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean latency per input over the first evaluation set (ms)")
    ax.set_title(f"edgeopt's choice (blue) and peer exports (grey) on {rows['cpu_model'].iloc[0]}", fontsize=9)
    ax.margins(x=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="svg")
    plt.close(fig)
    tmp.replace(path)


def run(cfg: EdgeoptConfig, root: Path, outputs: Catalog, summary: dict, peers_dir: Path, *, rounds: int,
        max_tokens: int | None, out: Path, on_round=None) -> tuple[pd.DataFrame, list[str], Path]:
    """The whole comparison for a run: its choices against the exports under `peers_dir`, written to `out` (csv of
    the summary and of every round, Markdown, plot); returns the summary, its metric columns and the folder."""
    from tasks.families import FAMILIES
    from tasks.stages import reference as reference_stage

    found = read_peers(peers_dir if peers_dir.is_absolute() else root / peers_dir)
    arms, kinds = arms_for(cfg, Catalog(root / outputs.base), found, summary, max_tokens)
    model_dir = root / catalog.model_folder(outputs.fetch_model_dir())
    family = FAMILIES.get(cfg.family.name)
    sets = [evaluation.load(s, family.class_names(model_dir)) for s in cfg.evaluation.sets]
    reference = root / outputs.reference_dir(max(cfg.seq_lens)) / reference_stage.OUTPUTS
    scorer = evaluation.Scorer(sets, np.load(reference), reference, cfg.evaluation.sets)
    rows, produced = compare(arms, Path(next(iter(arms.values()))[0]["bundle"]), cfg.family.name, scorer,
                             threads=cfg.benchmark.threads, warmup=cfg.benchmark.warmup_runs, rounds=rounds,
                             timeout_s=cfg.benchmark.worker_timeout_s, on_round=on_round)
    scores = {label: scorer.evaluations(o, "artifact") for label, o in produced.items()}
    table = summarise(rows, scores, kinds)
    metrics = [f"{s['eval_set']}_{s['metric_name']}" for s in next(iter(scores.values()))]
    folder = out if out.is_absolute() else root / out
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("peers.csv", table), ("peers-rounds.csv", rows)):
        tmp = folder / f"{name}.tmp"
        frame.to_csv(tmp, index=False)
        tmp.replace(folder / name)
    (folder / "peers.md.tmp").write_text(markdown(table, metrics), encoding="utf-8")
    (folder / "peers.md.tmp").replace(folder / "peers.md")
    plot(table, metrics[0], folder / "peers.svg")
    return table, metrics, folder
