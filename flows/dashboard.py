"""The human-facing report: `reports/<run>/index.html` (self-contained, opens offline) and `report.md`.

Built from what the report stage wrote to `metrics/` (benchmark.csv, compile.csv, latency_curve.csv,
seq_len_choice.csv, prune_search.csv, summary.json), so `edgeopt report` can rebuild it at any time. Plots are
matplotlib SVGs inlined into the HTML (no scripts, no CDN, no network) and written beside it for the
Markdown. Sections: the recommended artifact and sequence length per device and why; the
latency-vs-accuracy Pareto plot per sequence length with the accuracy budget line; latency against
sequence length per device with the share of inputs each length truncates; the pruning strengths the
prune stage tried and their drop on every evaluation set (and, when none held the budget, that the dense
model is recommended); per-layer sensitivity of the probed variants (sensitivity.csv); op placement per compiled
artifact (nodes on the accelerator, CPU fallback ops by name); all benchmark rows; tool versions and
the CPU. Simulated timings (QNN HTP simulator) and quick-mode rows are marked wherever they appear.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.core.catalog import AUTO_MIXED, SENSITIVITY_TABLE
from tasks.core.errors import InputError
from tasks.core.schemas import BUCKETS, DYNAMIC, PINNED, STATIC
from tasks.data.evaluation import metric_label

REPORTS = Path("reports")
PLOT_CACHE = Path(".edgeopt") / "plots"
INDEX = "index.html"
MARKDOWN = "report.md"
DEVICE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
BUNDLES = "bundles.csv"
SIM_NOTE = "simulated: QNN HTP simulator time on x86-64, not device latency"
QUICK_NOTE = "quick mode: few timed runs and an evaluation subset, for tests only; do not compare or deploy from these"


def run_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def load_metrics(metrics_dir: Path) -> dict:
    """The report stage's outputs; InputError naming the missing file and the command that writes it."""
    metrics_dir = Path(metrics_dir)
    found = {}
    for name in ("benchmark.csv", "evaluation.csv", "compile.csv", "latency_curve.csv", "seq_len_choice.csv",
                 "summary.json", "input_lengths.json"):
        path = metrics_dir / name
        if not path.is_file():
            raise InputError(f"{path}: not found; run `edgeopt run` (or `dvc repro`) to write {metrics_dir}/")
        found[name] = json.loads(path.read_text(encoding="utf-8")) if name.endswith(".json") else _read_csv(path)
    for name in ("prune_search.csv", SENSITIVITY_TABLE, BUNDLES):  # absent in metrics written before these stages existed
        path = metrics_dir / name
        found[name] = _read_csv(path) if path.is_file() else pd.DataFrame()
    mixed = metrics_dir / AUTO_MIXED
    found[AUTO_MIXED] = json.loads(mixed.read_text(encoding="utf-8")) if mixed.is_file() else []
    return found


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:  # a header-less empty table (e.g. no latency curve measured)
        return pd.DataFrame()


VARIANT_MARKERS = ("o", "s", "^", "D", "v", "P", "<", ">", "h", "*")


def _device_colors(devices) -> dict[str, str]:
    return {d: DEVICE_COLORS[i % len(DEVICE_COLORS)] for i, d in enumerate(sorted(devices))}


def _variant_markers(variants) -> dict[str, str]:
    """One marker per variant (fp32 and an int8 variant never share one); simulated rows are X."""
    return {v: VARIANT_MARKERS[i % len(VARIANT_MARKERS)] for i, v in enumerate(sorted(variants))}


def _plain_log_axis(axis) -> None:
    """Log-scale ticks read as 2, 5, 10, 20, 50 (not 2x10^0)."""
    import matplotlib.ticker

    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def metric_text(value: float, items: int, total: int, quick: bool = False) -> str:
    """A metric as shown anywhere a number is read: with a note when it comes from part of its set."""
    text = _fmt(value)
    if items < total or quick:
        text += f" ({items} of {total} items{', quick' if quick else ''})"
    return text


def _svg(fig, salt: str) -> str:
    """The figure as an <svg> element (no XML prolog), with ids unique to this plot."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _data_bytes(value: object) -> bytes:
    if isinstance(value, pd.DataFrame):
        return value.to_csv(index=False).encode()
    return json.dumps(value, sort_keys=True, default=str).encode()


def drawn(name: str, plot: Callable[..., str], *data: object, cache: Path | None = None) -> str:
    """`plot(*data)`, the SVG `name`, drawn once per distinct data and plotting code when `cache` is a folder: a run
    whose metrics did not change (every no-op run) reuses it instead of spending seconds in matplotlib."""
    if cache is None:
        return plot(*data)
    digest = hashlib.sha256(Path(__file__).read_bytes() + name.encode())
    for value in data:
        digest.update(_data_bytes(value))
    path = Path(cache) / f"{digest.hexdigest()}.svg"
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8")
    svg = plot(*data)
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the redrawing
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(svg, encoding="utf-8")
        os.replace(tmp, path)
    return svg


def _metric(bench: pd.DataFrame) -> tuple[str, str]:
    """(eval_set, metric_name) of the first evaluation set, which the rows' metric columns hold."""
    return str(bench["eval_set"].iloc[0]), str(bench["metric_name"].iloc[0])


def _label(row) -> str:
    target = "" if row["target"] == "host" else f"@{row['target']}"
    model = "" if row["model"] == "dense" else f"{row['model']}/"
    return f"{model}{row['variant']}{target}"


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Rows no other row beats on both latency (lower) and the metric (higher), fastest first."""
    ordered = points.sort_values(["latency_p50_ms", "metric_value"], ascending=[True, False])
    front, best = [], -np.inf
    for idx, r in ordered.iterrows():
        if r["metric_value"] > best:
            front.append(idx)
            best = r["metric_value"]
    return ordered.loc[front]


def plot_pareto(bench: pd.DataFrame, budget: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(bench["seq_len"].unique())
    colors = _device_colors(bench["device"].unique())
    markers = _variant_markers(bench["variant"].unique())
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.2 * len(lengths), 4.6), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        rows = bench[bench["seq_len"] == L]
        for _, r in rows.iterrows():
            sim = bool(r["simulated"])
            ax.scatter(r["latency_p50_ms"], r["metric_value"], s=60, color=colors[r["device"]],
                       marker="X" if sim else markers[r["variant"]],
                       edgecolors="black" if r["within_budget"] else "none", linewidths=1.2, zorder=3)
            ax.annotate(_label(r) + (" (sim)" if sim else ""), (r["latency_p50_ms"], r["metric_value"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=7)
        real = rows[~rows["simulated"].astype(bool)]
        if len(real):
            front = pareto_front(real)
            ax.step(front["latency_p50_ms"], front["metric_value"], where="post", color="#333333",
                    linewidth=1, linestyle=":", label="Pareto front (measured latency)")
        base = rows[(rows["variant"] == "fp32") & (rows["model"] == "dense") & ~rows["simulated"].astype(bool)]
        if len(base):
            line = float(base["metric_value"].iloc[0]) - budget
            ax.axhline(line, color="#c44e52", linestyle="--", linewidth=1.2,
                       label=f"accuracy budget: fp32 - {budget:g} = {line:.2f}")
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
        ax.set_xlabel("latency p50, ms (log scale; lower is better)")
        ax.set_ylabel(f"{metric_label(*_metric(bench))} (higher is better)")
        ax.set_title(f"sequence length {L}")
        ax.grid(True, which="both", alpha=0.3)
        for device, color in colors.items():
            ax.scatter([], [], color=color, label=device)
        for variant in sorted(rows["variant"].unique()):
            ax.scatter([], [], color="grey", marker=markers[variant], label=variant)
        if rows["simulated"].astype(bool).any():
            ax.scatter([], [], color="grey", marker="X", label="simulated latency (not device)")
        ax.scatter([], [], color="white", edgecolors="black", label="within budget (black edge)")
        # Below the axes, so it never hides a point.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    return _svg(fig, "pareto")


def plot_prune_search(searched: pd.DataFrame, budget: float) -> str:
    """Drop against dense per evaluation set and length, over the encoder weights each level kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(searched["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = searched[searched["model"] == model]
        for (eval_set, seq_len), line in rows.groupby(["eval_set", "seq_len"], sort=False):
            line = line.sort_values("encoder_weights_kept")
            ax.plot(100 * line["encoder_weights_kept"], line["drop"], marker="o", label=f"{eval_set} @ {seq_len}")
        for r in rows[rows["chosen"]].drop_duplicates("level").itertuples():
            ax.axvline(100 * r.encoder_weights_kept, color="#55a868", linewidth=1, label="kept level")
        ax.axhline(budget, color="#c44e52", linestyle="--", linewidth=1.2, label=f"accuracy budget ({budget:g})")
        for r in rows.drop_duplicates("level").itertuples():
            label = (f"channels -{r.channel_ratio:.0%}" if getattr(r, "channel_ratio", 0) > 0
                     else f"heads -{r.head_ratio:.0%}\nFFN -{r.ffn_ratio:.0%}")
            ax.annotate(label,
                        (100 * r.encoder_weights_kept, rows[rows["level"] == r.level]["drop"].max()),
                        textcoords="offset points", xytext=(4, 6), fontsize=7)
        ax.set_xlabel("encoder weights kept, % (fewer = faster)")
        ax.set_ylabel("metric points below dense (lower is better)")
        ax.set_title(f"pruning strengths tried for {model!r}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    return _svg(fig, "prune")


def _short_groups(names: pd.Series) -> pd.Series:
    """Layer-group names without the module path they all share (`/encoder/layer.` ...)."""
    prefix = os.path.commonprefix(list(names))
    prefix = prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""
    return names.str.slice(len(prefix))


AXIS_LABELS = {"float": ("quantized", "float"), "a8": ("8-bit", "16-bit")}
"""(lower, higher) precision of each sensitivity axis, as the report names them."""


def sensitivity_table(sensitivity: pd.DataFrame) -> pd.DataFrame:
    """One row per probed layer group: its size and what quantizing it alone / keeping it alone in float does."""
    rows = []
    for (model, variant, seq_len), probes in sensitivity.groupby(["model", "variant", "seq_len"], sort=False):
        groups = probes[probes["probe"] != "all"]
        first = probes.iloc[0]
        for group, g in groups.groupby("group", sort=False):
            by = g.set_index("probe")
            row = {"model": model, "variant": variant, "L": int(seq_len), "group": group, "layers": int(g["layers"].iloc[0]),
                   "MMACs": f"{g['macs'].iloc[0] / 1e6:.0f}"}
            lower, higher = AXIS_LABELS[first["axis"]]
            if "alone" in by.index:
                row[f"only this {lower}: vs fp32"] = f"{by.loc['alone', 'metric_delta']:+.2f}"
            if "kept" in by.index:
                row[f"only this {higher}: vs all {lower}"] = (
                    f"{by.loc['kept', 'metric_value'] - first['all_lowered_metric']:+.2f}")
            rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.assign(group=_short_groups(frame["group"])) if len(frame) else frame


def mixed_table(assignments: list[dict]) -> pd.DataFrame:
    """One row per auto_mixed variant: the groups it keeps at the higher precision and what that measured."""
    return pd.DataFrame([{
        "variant": a["variant"], "model": a["model"], "base": a["base"], "chosen at L": a["seq_len"],
        "groups at the higher precision": (
            f"{len(a['higher_groups'])} of {a['groups']} {AXIS_LABELS[a['axis']][1]}, the rest "
            f"{AXIS_LABELS[a['axis']][0]}: "
            f"{', '.join(_short_groups(pd.Series(a['higher_groups'])))}" if a["higher_groups"]
            else f"0 of {a['groups']}"),
        f"linear layers {AXIS_LABELS[a['axis']][0]}": f"{a['layers'] - a['higher_layers']} of {a['layers']}",
        "points below fp32 (all items)": f"{a['loss']:+.3f} on {a['eval_items']}", "budget": f"{a['budget']:g}",
        "within budget": _fmt(bool(a["within_budget"])),
    } for a in assignments])


def mixed_overrides(assignments: list[dict]) -> str:
    """The assignments as params.yaml variants of their base's recipe (paste under quantize.variants)."""
    import yaml

    models = {a["model"] for a in assignments}
    variants = {a["variant"] if len(models) == 1 else f"{a['variant']}_{a['model']}": a["settings"] for a in assignments}
    return yaml.safe_dump({"quantize": {"variants": variants}}, sort_keys=False, width=120)


def plot_sensitivity(sensitivity: pd.DataFrame) -> str:
    """Per layer group: the metric change when only it is quantized (vs fp32) and when only it stays float
    (vs the fully quantized variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(sensitivity.groupby(["model", "variant", "seq_len"], sort=False))
    height = max(3.0, 0.22 * max(len(p["group"].unique()) for _, p in runs) + 1.4)
    fig, axes = plt.subplots(len(runs), 2, figsize=(12.4, height * len(runs)), squeeze=False)
    for row, ((model, variant, seq_len), probes) in zip(axes, runs):
        first = probes.iloc[0]
        groups = probes[probes["probe"] != "all"].assign(group=lambda f: _short_groups(f["group"]))
        order = list(dict.fromkeys(groups["group"]))
        lower, higher = AXIS_LABELS[first["axis"]]
        panels = (("alone", "metric_delta", f"only this group {lower}: {first['metric_name']} vs fp32",
                   "#c44e52", first["all_lowered_metric"] - first["fp32_metric"], f"all groups {lower}"),
                  ("kept", None, f"only this group {higher}: vs all {lower}", "#55a868", None, None))
        for ax, (probe, column, title, color, line, line_label) in zip(row, panels):
            g = groups[groups["probe"] == probe].set_index("group").reindex(order)
            values = g[column] if column else g["metric_value"] - first["all_lowered_metric"]
            ax.barh(range(len(order)), values.fillna(0), color=color)
            if line is not None:
                ax.axvline(line, color="black", linestyle="--", linewidth=1, label=f"{line_label} ({line:+.2f})")
                ax.legend(fontsize=7, loc="lower left")
            ax.axvline(0, color="grey", linewidth=0.8)
            ax.set_yticks(range(len(order)), order, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("metric points")
            ax.set_title(f"{model}/{variant} L={seq_len}: {title}", fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _svg(fig, "sensitivity")


def plot_bundles(bundles: pd.DataFrame, coverage: float) -> str:
    """Per device and compile target: mean latency over the user's inputs of every timed bundle row, static
    lengths and buckets side by side (hatched: outside the accuracy budget; faded: keeps fewer than `coverage`
    of the inputs whole)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = bundles[~bundles["simulated"].astype(bool)].dropna(subset=["latency_mix_mean_ms"])
    groups = list(timed.groupby(["device", "target"], sort=False))
    height = max(2.4, 0.26 * max(len(g) for _, g in groups) + 1.2)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9.6, height * len(groups)), squeeze=False)
    colors = {STATIC: "#8c8c8c", BUCKETS: "#4c72b0", DYNAMIC: "#55a868", PINNED: "#8172b3"}
    for ax, ((device, target), rows) in zip(axes[:, 0], groups):
        rows = rows.sort_values("latency_mix_mean_ms")
        labels = [f"{r.model}/{r.variant} {r.policy} {r.shapes}" for r in rows.itertuples()]
        ax.barh(range(len(rows)), rows["latency_mix_mean_ms"], color=[colors[p] for p in rows["policy"]],
                edgecolor="white")
        for i, r in enumerate(rows.itertuples()):
            if r.covered_share < coverage:
                ax.patches[i].set_alpha(0.35)
        for i, r in enumerate(rows.itertuples()):
            if not r.within_budget:
                ax.barh(i, r.latency_mix_mean_ms, color="none", hatch="///", edgecolor="#c44e52", linewidth=0)
            ax.text(r.latency_mix_mean_ms, i, f" {r.latency_mix_mean_ms:.2f} ms, {r.truncated_inputs} cut", va="center",
                    fontsize=7)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("mean latency over your inputs (ms)")
        ax.set_title(f"{device} / {target}: grey one static length, blue buckets, green dynamic, purple pinned; hatched: outside the budget; "
                     f"faded: keeps < {coverage:.0%} of inputs whole", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        ax.margins(x=0.25)
    fig.tight_layout()
    return _svg(fig, "bundles")


def bundle_table(bundles: pd.DataFrame) -> pd.DataFrame:
    order = bundles.sort_values(["device", "target", "latency_mix_mean_ms"])
    return pd.DataFrame({
        "device": order["device"], "target": order["target"], "deploy": order["model"] + "/" + order["variant"],
        "precision": order["precision"].fillna(""),
        "shapes": order["policy"] + " " + order["shapes"].astype(str),  # one length alone reads back as a number
        "mean ms": [f"{_fmt(v)}{' (sim: not timed)' if s else ''}"
                    for v, s in zip(order["latency_mix_mean_ms"], order["simulated"].astype(bool))],
        "p99 ms": order["latency_mix_p99_ms"].map(_fmt),
        "inputs cut": [f"{t}/{n}" for t, n in zip(order["truncated_inputs"], order["mix_inputs"])],
        "metric": order["metric_value"].map(_fmt), "in budget": order["within_budget"].map({True: "yes", False: "no"}),
        "artifacts": order["contexts"], "MB": order["size_mb"].map(lambda v: _fmt(v, ".1f")),
        "compile s": order["compile_s"].map(lambda v: _fmt(v, ".0f")) if "compile_s" in order else "",
    })


def shape_choice_table(summary: dict) -> pd.DataFrame:
    rows = [{"device": key.split("/", 1)[0], "target": key.split("/", 1)[1], "deploy": f"{c['model']}/{c['variant']}",
             "shapes": f"{c['policy']} {c['shapes']}", "mean ms": f"{c['latency_mix_mean_ms']:.2f}",
             "p99 ms": f"{c['latency_mix_p99_ms']:.2f}", "why": c["reason"]}
            for key, c in sorted(summary.get("shape_choice", {}).items())]
    return pd.DataFrame(rows)


def prune_search_table(searched: pd.DataFrame) -> pd.DataFrame:
    """One row per model and level tried: the shares removed, weights kept, and the drop on each set@length."""
    rows = []
    for (model, level), group in searched.groupby(["model", "level"], sort=False):
        first = group.iloc[0]
        if first.get("channel_ratio", 0) > 0:  # an image classifier: convolution channels, all its weights
            row = {"model": model, "level": int(level), "channels removed": f"{first['channel_ratio']:.0%}",
                   "weights kept": f"{first['encoder_weights_kept']:.0%}"}
        else:
            row = {"model": model, "level": int(level), "heads removed": f"{first['head_ratio']:.0%}",
                   "FFN removed": f"{first['ffn_ratio']:.0%}", "encoder weights kept": f"{first['encoder_weights_kept']:.0%}"}
        for r in group.itertuples():
            row[f"{r.eval_set} @ {r.seq_len}"] = f"{r.metric_value:.2f} ({-r.drop:+.2f})"
        row["within budget on every set"] = _fmt(bool(first["level_within_budget"]))
        row["kept"] = "yes" if bool(first["chosen"]) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def prune_search_notes(summary: dict, budget: float) -> list[str]:
    notes = []
    for model, verdict in summary.get("prune_search", {}).items():
        if verdict["met_budget"]:
            continue
        notes.append(f"No pruning level of model {model!r} stayed within {budget:g} points of the dense model on "
                     f"every evaluation set ({verdict['levels_tried']} tried): the dense model is recommended. "
                     f"The {model!r} rows show the weakest level tried, for comparison.")
    return notes


def plot_seq_len(bench: pd.DataFrame, curve: pd.DataFrame, choice: pd.DataFrame, truncated: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12.4, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    colors = _device_colors(bench["device"].unique())
    markers = _variant_markers(bench["variant"].unique())
    # Simulator times are seconds where devices take milliseconds, and are not device latency: the
    # curve shows measured devices only (simulated rows stay in the table below and the Pareto plot).
    measured = bench[~bench["simulated"].astype(bool)].assign(measured_by="benchmark")
    points = pd.concat([measured, curve], ignore_index=True) if len(curve) else measured
    styles = ["-", "--", "-.", ":"]
    for i, ((device, target, model, variant), g) in enumerate(
        points.groupby(["device", "target", "model", "variant"], sort=True)
    ):
        g = g.sort_values("seq_len")
        label = f"{device} {_label({'model': model, 'variant': variant, 'target': target})}"
        ax.plot(g["seq_len"], g["latency_p50_ms"], marker=markers.get(variant, "o"), color=colors.get(device, "grey"),
                linestyle=styles[i % len(styles)], label=label)
    choice = choice[~choice["simulated"].astype(bool)]
    for r in choice[choice["chosen"].astype(bool)].itertuples():
        ax.scatter(r.seq_len, r.latency_p50_ms, s=220, marker="*", color=colors.get(r.device, "grey"),
                   edgecolors="black", zorder=4)
    ax.scatter([], [], s=150, marker="*", color="white", edgecolors="black", label="recommended length")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("latency p50, ms (log scale)")
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_title("latency vs sequence length (measured devices)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if truncated:
        xs = sorted(int(k) for k in truncated)
        ax2.plot(xs, [100 * truncated[str(x)] for x in xs], color="#4c72b0")
        ax2.set_xscale("log", base=2)
        ax2.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax2.set_xlabel("sequence length (tokens, log scale)")
        ax2.set_ylabel("% of inputs truncated")
        ax2.set_title("your inputs: share cut at each length")
        ax2.grid(True, alpha=0.3)
        for L in sorted(set(int(x) for x in choice["seq_len"])):
            ax2.axvline(L, color="#999999", linewidth=0.8, linestyle=":")
    fig.tight_layout()
    return _svg(fig, "seq_len")


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return format(float(value), spec)
    return str(value)


def results_table(bench: pd.DataFrame) -> pd.DataFrame:
    """The benchmark rows as people read them: marks for simulated and quick numbers."""
    out = pd.DataFrame({
        "model": bench["model"], "variant": bench["variant"], "device": bench["device"], "target": bench["target"],
        "L": bench["seq_len"], "precision": bench["precision"],
        "p50 ms": [f"{_fmt(v)}{' (sim)' if s else ''}" for v, s in zip(bench["latency_p50_ms"], bench["simulated"])],
        "p99 ms": bench["latency_p99_ms"].map(_fmt),
        "p50 spread %": bench["latency_p50_spread_pct"].map(lambda v: _fmt(v, ".1f")),
        "runs": bench["timed_runs"].astype(str) + np.where(bench["quick"], " (quick)", ""),
        "cold ms": bench["cold_start_ms"].map(lambda v: _fmt(v, ".0f")),
        "warm ms": bench["warm_start_ms"].map(lambda v: _fmt(v, ".0f")),
        "RSS MB": bench["peak_rss_mb"].map(lambda v: _fmt(v, ".0f")),
        "MB": bench["size_mb"].map(lambda v: _fmt(v, ".1f")),
        metric_label(*_metric(bench)): [metric_text(v, n, t, q) for v, n, t, q in zip(
            bench["metric_value"], bench["eval_items"], bench["eval_total_items"], bench["quick"])],
        "drop": bench["metric_drop"].map(lambda v: _fmt(v, "+.2f")),
        "in budget": bench["within_budget"].map(_fmt),
        "cos→fp32 min": bench["cosine_to_fp32_min"].map(lambda v: _fmt(v, ".4f")),
        "accuracy from": bench["accuracy_source"].replace({"cpu_ep_same_graph": "same graph on CPU EP",
                                                          "artifact": "this artifact"}),
        "sim subset": [
            "" if pd.isna(n) else f"{sp:.2f} on the first {int(n)} items, cos→CPU EP min {c:.4f}"
            for n, sp, c in zip(bench["sim_items"], bench["sim_metric_value"], bench["sim_cosine_to_cpu_ep_min"])
        ],
    })
    return out


def evaluation_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Every evaluation set's metric per artifact: one column per set, its drop and verdict beside it."""
    if scores.empty:
        return pd.DataFrame()
    rows = []
    for key, group in scores.groupby(["model", "variant", "device", "target", "seq_len"], sort=False):
        row = dict(zip(["model", "variant", "device", "target", "L"], key))
        for r in group.itertuples():
            label = metric_label(r.eval_set, r.metric_name)
            subset = f", {r.items} of {r.total_items} items" if r.items < r.total_items else ""
            row[label] = f"{r.metric_value:.2f} ({-r.drop:+.2f}{'' if r.within_budget else ', over budget'}{subset})"
        row["in budget on every set"] = _fmt(bool(group["within_budget"].all()))
        rows.append(row)
    return pd.DataFrame(rows)


def placement_table(compiled: pd.DataFrame) -> pd.DataFrame:
    if compiled.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "device": compiled["device"], "target": compiled["target"], "variant": compiled["variant"],
        "L": compiled["seq_len"], "status": compiled["status"],
        "nodes on accelerator": compiled["npu_nodes"].map(lambda v: _fmt(v, ".0f")),
        "CPU fallback nodes": compiled["cpu_fallback_nodes"].map(lambda v: _fmt(v, ".0f")),
        "fallback ops": [("none" if not isinstance(ops, str) or not ops else ops) if status == "compiled" else ""
                         for ops, status in zip(compiled["cpu_fallback_op_types"], compiled["status"])],
        "compile s": compiled["compile_s"].map(lambda v: _fmt(v, ".1f")),
        "cached compile s": compiled["cached_compile_s"].map(lambda v: _fmt(v, ".1f")),
        "cos→source min": compiled["verify_min_cosine"].map(lambda v: _fmt(v, ".5f")),
        "run ms": [f"{_fmt(v, '.1f')}{' (sim)' if s and not pd.isna(v) else ''}"
                   for v, s in zip(compiled["verify_run_ms_median"], compiled["simulated"])],
    })


def recommendations(bench: pd.DataFrame, summary: dict) -> pd.DataFrame:
    """Per device and compile target: what to deploy, at which length, and why."""
    choices = summary.get("seq_len_choice", {}).get("choice", {})
    rows = []
    for key, c in sorted(choices.items()):
        device, target = key.split("/", 1)
        at = bench[(bench["device"] == device) & (bench["target"] == target) & (bench["model"] == c["model"])
                   & (bench["variant"] == c["variant"])]
        acc = at[at["seq_len"] == c["seq_len"]] if c["measured_by"] == "benchmark" else at
        artifact = acc["artifact"].iloc[0] if len(acc) and c["measured_by"] == "benchmark" else \
            f"export at {c['seq_len']} tokens (not built by the main job)"
        value = (metric_text(acc["metric_value"].iloc[0], acc["eval_items"].iloc[0], acc["eval_total_items"].iloc[0],
                             bool(acc["quick"].iloc[0])) if len(acc) else "")
        rows.append({"device": device, "target": target, "deploy": f"{c['model']}/{c['variant']}",
                     "seq_len": c["seq_len"], "p50 ms": f"{c['latency_p50_ms']:.2f}" + (" (sim)" if c["simulated"] else ""),
                     metric_label(*_metric(bench)): value, "artifact": artifact, "why": c["reason"]})
    return pd.DataFrame(rows)


def tool_table(bench: pd.DataFrame) -> pd.DataFrame:
    tools: dict[str, set[str]] = {}
    for text in bench["tool_versions"].dropna():
        for part in str(text).split("; "):
            name, _, version = part.partition(" ")
            tools.setdefault(name, set()).add(version)
    rows = [{"tool": k, "version": ", ".join(sorted(v))} for k, v in sorted(tools.items())]
    cpus = sorted(set(bench["cpu_model"].astype(str)))
    flags = sorted(set(bench["cpu_flags"].fillna("").astype(str)))
    rows += [{"tool": "CPU", "version": "; ".join(cpus)}, {"tool": "CPU flags", "version": "; ".join(flags)},
             {"tool": "threads", "version": ", ".join(str(t) for t in sorted(bench["threads"].unique()))}]
    return pd.DataFrame(rows)


def _html_table(frame: pd.DataFrame, wide: bool = False) -> str:
    if frame.empty:
        return "<p class='muted'>none</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False)
    )
    return f"<div class='scroll'><table class='{'wide' if wide else ''}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c8d3de;font-size:13px}header a{color:#fff}main{padding:8px 32px 40px;max-width:1400px}
h2{margin-top:32px;border-bottom:2px solid #dde3ea;padding-bottom:4px;font-size:18px}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:12.5px;background:#fff;margin:8px 0}
th,td{border:1px solid #dde3ea;padding:4px 8px;text-align:left;vertical-align:top}th{background:#eef2f6}
td{white-space:nowrap}table.wide td:nth-last-child(-n+2){white-space:normal;overflow-wrap:anywhere}table.wide td:last-child{min-width:360px}
.note{background:#fff8e1;border-left:4px solid #f0b429;padding:8px 12px;font-size:13px;margin:10px 0}
.warn{background:#fdecea;border-left:4px solid #c44e52;padding:8px 12px;font-size:14px;margin:10px 0;font-weight:600}
.plot{background:#fff;border:1px solid #dde3ea;padding:8px;margin:8px 0;overflow-x:auto}.plot svg{max-width:100%;height:auto}
.muted{color:#777}
"""


def build(metrics: dict, run: str, budget: float, links: dict[str, str],
          plot_cache: Path | None = None) -> tuple[str, str, dict[str, str]]:
    """(index.html, report.md, {plot file: svg}) for the metrics of one run; plots are reused from `plot_cache`."""
    bench, compiled = metrics["benchmark.csv"], metrics["compile.csv"]
    curve, choice, summary = metrics["latency_curve.csv"], metrics["seq_len_choice.csv"], metrics["summary.json"]
    bench = bench.assign(simulated=bench["simulated"].astype(bool), quick=bench["quick"].astype(bool))
    inputs = metrics["input_lengths.json"]
    plots = {
        "pareto.svg": drawn("pareto.svg", plot_pareto, bench, budget, cache=plot_cache),
        "seq_len.svg": drawn("seq_len.svg", plot_seq_len, bench, curve, choice, inputs["truncated_share"],
                             cache=plot_cache),
    }
    searched = metrics["prune_search.csv"]
    if len(searched):
        plots["prune_search.svg"] = drawn("prune_search.svg", plot_prune_search, searched, budget, cache=plot_cache)
    pruning = prune_search_table(searched) if len(searched) else pd.DataFrame()
    probed = metrics[SENSITIVITY_TABLE]
    if len(probed):
        plots["sensitivity.svg"] = drawn("sensitivity.svg", plot_sensitivity, probed, cache=plot_cache)
    sensitivity = sensitivity_table(probed) if len(probed) else pd.DataFrame()
    coverage = summary.get("seq_len_choice", {}).get("coverage")
    bundled = metrics[BUNDLES]
    timed_bundles = bundled[~bundled["simulated"].astype(bool)].dropna(subset=["latency_mix_mean_ms"]) \
        if len(bundled) else bundled
    if len(timed_bundles):
        plots["bundles.svg"] = drawn("bundles.svg", plot_bundles, bundled, coverage or 1.0, cache=plot_cache)
    bundles, shapes = (bundle_table(bundled), shape_choice_table(summary)) if len(bundled) else (pd.DataFrame(),) * 2
    assignments = metrics[AUTO_MIXED]
    mixed = mixed_table(assignments) if assignments else pd.DataFrame()
    recs, placement, results, tools = (recommendations(bench, summary), placement_table(compiled),
                                       results_table(bench), tool_table(bench))
    per_set = evaluation_table(metrics["evaluation.csv"])
    unstable = bench[~bench["latency_stable"].astype(bool) & ~bench["simulated"]]
    banners = []
    if bench["quick"].any():
        banners.append(f"<div class='warn'>QUICK MODE: {html.escape(QUICK_NOTE)}</div>")
    notes = prune_search_notes(summary, budget)
    if bench["simulated"].any():
        notes.append(f"Rows marked (sim) / X markers: {SIM_NOTE}. Their accuracy columns come from the identical "
                     "QDQ graph on the ONNX Runtime CPU EP over the full test split; the compiled context's own "
                     "agreement is the 'sim subset' column.")
    if len(unstable):
        names = ", ".join(f"{r.model}/{r.variant}/{r.device}/{r.target}/{r.seq_len} ({r.latency_p50_spread_pct:.0f} %)"
                          for r in unstable.itertuples())
        notes.append(f"Latency p50 of these rows varied across repeats by more than the tolerance: {names}.")
    lengths = (f"{inputs.get('inputs')} inputs, p50 {inputs.get('p50', 0):.0f} / p99 {inputs.get('p99', 0):.0f} / "
               f"max {inputs.get('max')} tokens" if inputs else "")

    sections = [
        ("Recommended artifact per device",
         f"<p>The smallest measured sequence length that keeps {coverage:.0%} of your inputs whole ({lengths}), "
         "and the fastest artifact within the accuracy budget at it.</p>" + _html_table(recs, wide=True)
         if coverage is not None else _html_table(recs, wide=True)),
        *([("Latency on your inputs: static length vs buckets",
            "<p>Each row's artifacts deployed one way, timed on a seeded sample of your inputs (each run at the "
            "shape that deployment would use, interleaved in one process); the recommendation keeps "
            f"{coverage or 0:.0%} of the inputs whole within the accuracy budget.</p>" + _html_table(shapes, wide=True)
            + (f"<div class='plot'>{plots['bundles.svg']}</div>" if "bundles.svg" in plots else "")
            + _html_table(bundles))] if len(bundles) else []),
        ("Latency vs accuracy", f"<div class='plot'>{plots['pareto.svg']}</div>"),
        ("Latency vs sequence length", f"<div class='plot'>{plots['seq_len.svg']}</div>" + _html_table(
            choice.assign(truncated_share=(100 * choice["truncated_share"]).round(2)).drop(columns=["covered_share"])
            .rename(columns={"truncated_share": "% truncated", "latency_p50_ms": "p50 ms", "measured_by": "measured by",
                             "seq_len": "L"})) if len(choice) else ""),
        ("Accuracy on every evaluation set (vs dense fp32 at the same length)", _html_table(per_set)),
        *([("Pruning strength: the levels tried (torch fp32 vs dense, on the evaluation sets themselves)",
            f"<div class='plot'>{plots['prune_search.svg']}</div>" + _html_table(pruning, wide=True))]
          if len(pruning) else []),
        *([("Per-layer sensitivity (seeded evaluation subset; each probe a real build of the variant)",
            f"<div class='plot'>{plots['sensitivity.svg']}</div>" + _html_table(sensitivity, wide=True))]
          if len(sensitivity) else []),
        *([("Mixed precision chosen (auto_mixed): layer groups at the higher precision within the budget",
            _html_table(mixed, wide=True) + "<p>The same, as variants to paste into params.yaml:</p><pre>"
            + html.escape(mixed_overrides(assignments)) + "</pre>")] if assignments else []),
        ("Op placement per compiled artifact", _html_table(placement)),
        ("All benchmark rows", _html_table(results)),
        ("Tools and machine", _html_table(tools)),
    ]
    body = "".join(f"<h2>{html.escape(t)}</h2>{c}" for t, c in sections)
    note_html = "".join(f"<div class='note'>{html.escape(n)}</div>" for n in notes)
    link_html = "".join(f" · <a href='{html.escape(url, quote=True)}'>{html.escape(name)}</a>" for name, url in links.items())
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>edgeopt report {html.escape(run)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>edgeopt report</h1><p>run {html.escape(run)} · {len(bench)} benchmark rows · "
        f"accuracy budget {budget:g} metric points below fp32 on every evaluation set{link_html}</p></header>"
        f"<main>{''.join(banners)}{note_html}{body}</main></body></html>"
    )

    md = [f"# edgeopt report {run}", "", *(f"- {name}: {url}" for name, url in links.items()), ""]
    if bench["quick"].any():
        md += [f"> **QUICK MODE**: {QUICK_NOTE}", ""]
    md += [f"> {n}" for n in notes] + ([""] if notes else [])
    md += ["## Recommended artifact per device", "", recs.to_markdown(index=False) if len(recs) else "none", "",
           *(["## Latency on your inputs: static length vs buckets", "", shapes.to_markdown(index=False), "",
              *(["![latency on your inputs](bundles.svg)", ""] if "bundles.svg" in plots else []),
              bundles.to_markdown(index=False, disable_numparse=True), ""] if len(bundles) else []),
           "## Latency vs accuracy", "", "![latency vs accuracy](pareto.svg)", "",
           "## Latency vs sequence length", "", "![latency vs sequence length](seq_len.svg)", "",
           choice.to_markdown(index=False, floatfmt=".4g") if len(choice) else "", "",
           "## Accuracy on every evaluation set", "", per_set.to_markdown(index=False) if len(per_set) else "none", "",
           *(["## Pruning strength: the levels tried", "", "![pruning strengths tried](prune_search.svg)", "",
              pruning.to_markdown(index=False), ""] if len(pruning) else []),
           *(["## Per-layer sensitivity", "", "![per-layer sensitivity](sensitivity.svg)", "",
              sensitivity.to_markdown(index=False, disable_numparse=True), ""] if len(sensitivity) else []),
           *(["## Mixed precision chosen (auto_mixed)", "", mixed.to_markdown(index=False, disable_numparse=True), "",
              "As variants to paste into params.yaml:", "", "```yaml", mixed_overrides(assignments).rstrip(), "```", ""]
             if assignments else []),
           "## Op placement per compiled artifact", "", placement.to_markdown(index=False) if len(placement) else "none",
           "", "## All benchmark rows", "", results.to_markdown(index=False), "",
           "## Tools and machine", "", tools.to_markdown(index=False), ""]
    return page, "\n".join(md), plots


def write_report(metrics_dir: Path, out_dir: Path, budget: float, run: str | None = None,
                 links: dict[str, str] | None = None, plot_cache: Path | None = None) -> list[Path]:
    """Build the report from `metrics_dir` into `out_dir` (e.g. reports/<run>); returns the files written.
    `links`: where else this run is (its MLflow run, its Prefect flow run), shown in the header; plots are
    reused from `plot_cache` (the project's PLOT_CACHE) when drawn before from the same data."""
    metrics = load_metrics(metrics_dir)
    page, md, plots = build(metrics, run or Path(out_dir).name, budget, links or {}, plot_cache)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in ((INDEX, page), (MARKDOWN, md), *plots.items()):
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    return written
