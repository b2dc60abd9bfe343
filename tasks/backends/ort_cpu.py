"""ONNX Runtime on the CPU execution provider.

`compile` saves the model as ONNX Runtime optimizes it for this EP (offline mode: the optimized graph
is the artifact, so a deployment skips the optimization pass); `load` runs an ONNX model.
Levels above `extended` may add layout transformations (NCHWc, `com.microsoft.nchwc` ops) specific to
this CPU's vector width: ORT then warns the saved model "should only be used in the same environment
the model was optimized in". `extended` adds only ORT contrib ops (`com.microsoft`), which every ORT
CPU build runs. The compile record says which of both the artifact holds.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from tasks.backends.base import DeviceCompileParams
from tasks.core.errors import BackendUnavailableError, StageError
from tasks.core.feeds import build_feeds
from tasks.core.fingerprint import write_json_atomic

COMPILED_ARTIFACT = "model_opt.onnx"
SESSION_CONFIG_FILE = "ort_config.json"
CPU_EP = "CPUExecutionProvider"
OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}
HARDWARE_SPECIFIC_LEVELS = ("layout", "all")
LAYOUT_DOMAINS = ("com.microsoft.nchwc",)
"""Op domains of layout transformations tied to the vector width of the CPU the model was optimized on."""


@dataclass
class _OrtModel:
    session: object
    output: str
    precision: str

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        # Surgery may have changed input dtypes or replaced the mask by a float bias.
        return self.session.run([self.output], build_feeds(self.session, feed))[0]


def _precision(model_path: Path) -> str:
    """What the graph computes in: fp32, or the integer types of its QDQ / dynamic-quant nodes."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops:
        return "int8 dynamic (fp32 activations)"
    if "QuantizeLinear" not in ops:
        return "fp32"
    inits = {i.name: i for i in model.graph.initializer}
    names = {onnx.helper.tensor_dtype_to_np_dtype(inits[n.input[2]].data_type).name
             for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}
    return "QDQ " + "/".join(sorted(names)) if names else "QDQ"


class OrtCpuCompileParams(DeviceCompileParams):
    """ONNX Runtime CPU EP: the artifact is the graph as ORT optimizes it, saved once (offline mode)."""

    graph_optimization_level: Literal["disable", "basic", "extended", "layout", "all"] = Field(
        "extended",
        description="extended: fusions into ORT contrib ops, portable to any ORT CPU build; layout/all add "
        "layout transforms ORT ties to this CPU",
    )

    def backend_options(self, target: str | None, threads: int) -> dict[str, Any]:
        return {"graph_optimization_level": self.graph_optimization_level, "threads": threads}


_GLOBAL_POOL: dict[str, int] = {}


def _global_thread_pool(threads: int) -> None:
    """Create ONNX Runtime's process-wide thread pool once. From then on ORT refuses any session of this process
    that keeps a pool of its own, so every later `load` here shares it too."""
    import onnxruntime as ort

    if "threads" not in _GLOBAL_POOL:
        ort.capi.onnxruntime_pybind11_state.set_global_thread_pool_sizes(threads, 1)
        _GLOBAL_POOL["threads"] = threads
    elif _GLOBAL_POOL["threads"] != threads:
        raise BackendUnavailableError(
            f"ort_cpu: this process shares a {_GLOBAL_POOL['threads']}-thread pool; cannot share one of {threads}")


class OrtCpuBackend:
    name = "ort_cpu"
    engine_package = "onnxruntime"
    compile_params = OrtCpuCompileParams
    dynamic_shapes = True
    pins_shapes = False

    def accelerator_nodes(self, placement: dict) -> int:
        return 0

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return f"onnxruntime not importable: {exc}"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CPUExecutionProvider"
        return None

    def load(self, artifact: Path, threads: int, shared_threads: bool = False) -> _OrtModel:
        """A session on `threads` intra-op threads of its own, or (`shared_threads`) of the process-wide pool every
        shared session uses: several sessions in one process (a bundle's buckets) must not each keep a pool
        spinning after its runs."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if shared_threads or _GLOBAL_POOL:
            _global_thread_pool(threads)
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        return _OrtModel(session=session, output=session.get_outputs()[0].name, precision=_precision(Path(artifact)))

    def compile(self, model: Path, out_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Save `model` as ONNX Runtime optimizes it at `options["graph_optimization_level"]` (disable,
        basic, extended, layout, all) into `out_dir/model_opt.onnx`, plus `ort_config.json` (the session
        options to load it with). Returns artifact, files, placement (nodes per EP as partitioned, the saved
        graph's op types with ORT contrib and layout ones apart), compile_seconds, options, versions
        and precision (of the source: fused kernels hide the quantization ops).
        """
        import onnx
        import onnxruntime as ort

        model, out_dir = Path(model), Path(out_dir)
        level, threads = options["graph_optimization_level"], int(options["threads"])
        if level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"ort_cpu compile: graph_optimization_level {level!r} not in {list(OPTIMIZATION_LEVELS)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path = out_dir / COMPILED_ARTIFACT

        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[level])
        session_options.optimized_model_filepath = str(out_path)
        session_options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        start = time.perf_counter()
        try:
            session = ort.InferenceSession(str(model), session_options, providers=[CPU_EP])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), exc.__class__.__name__)
            raise StageError(f"ort_cpu: optimizing {model.name} at level {level} failed: {first[:300]}") from exc
        seconds = time.perf_counter() - start

        # Nodes as ORT partitions them among EPs: after its EP-independent (basic) passes, before fusions.
        per_ep = Counter()
        for subgraph in session.get_provider_graph_assignment_info():
            per_ep[subgraph.ep_name] += len(subgraph.get_nodes())
        optimized = onnx.load(str(out_path), load_external_data=False)
        counted = Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in optimized.graph.node)
        ops = dict(sorted(counted.items()))
        layout_ops = {op: k for op, k in ops.items() if op.split(":")[0] in LAYOUT_DOMAINS}
        contrib = {op: k for op, k in ops.items() if op.startswith("com.microsoft")}
        # ORT's own rule (it warns when saving): above `extended`, the saved model is for this CPU only.
        hardware_specific = level in HARDWARE_SPECIFIC_LEVELS
        config = {
            "graph_optimization_level": level,
            "intra_op_num_threads": threads,
            "inter_op_num_threads": 1,
            "execution_mode": "sequential",
        }
        write_json_atomic(
            out_dir / SESSION_CONFIG_FILE,
            {
                "session_options": config,
                "optimized_with": OPTIMIZATION_LEVELS[level],
                # Re-running the passes on an optimized graph is wasted session-creation time.
                "load_with": "ORT_DISABLE_ALL",
                "hardware_specific": hardware_specific,
                "how_to_load": (
                    "import onnxruntime as ort; o = ort.SessionOptions(); o.graph_optimization_level = "
                    f"ort.GraphOptimizationLevel.ORT_DISABLE_ALL; o.intra_op_num_threads = {threads}; "
                    f"s = ort.InferenceSession('{COMPILED_ARTIFACT}', o, providers=['{CPU_EP}'])"
                ),
            },
        )
        return {
            "artifact": COMPILED_ARTIFACT,
            "files": [COMPILED_ARTIFACT, SESSION_CONFIG_FILE],
            "placement": {
                "nodes_total": sum(per_ep.values()),
                "nodes_per_ep": dict(per_ep),
                "optimized_nodes": len(optimized.graph.node),
                "optimized_op_types": ops,
                "contrib_op_types": contrib,
                "layout_op_types": layout_ops,
                "cpu_fallback": {"count": 0, "op_types": {}, "nodes": []},
            },
            "compile_seconds": seconds,
            "options": {**config, "hardware_specific": hardware_specific},
            "versions": {"onnxruntime": ort.__version__, "onnx": metadata.version("onnx")},
            "precision": _precision(model),
        }


BACKEND = OrtCpuBackend()
