"""Qualcomm QNN HTP (Hexagon NPU) through the onnxruntime-qnn plugin execution provider.

`compile` turns an ONNX model (QDQ for integer precision, fp32 runs as fp16) into an EPContext model
plus a QNN context binary for one SoC; `load` runs such a model, or an uncompiled one, on the HTP.

On x86-64 the HTP backend library is Qualcomm's simulator and offline compiler: numerics and op
placement are those of the device, timings are not (`simulated` is True; reports must say so).
Facts this module relies on (onnxruntime 1.31, onnxruntime-qnn 2.7 / QNN SDK 2.51, x86-64):
- the EP is a plugin library, registered once per process; `providers=["QNNExecutionProvider"]`
  silently runs on CPU, so sessions are built with `add_provider_for_devices`;
- finalizing a graph needs `soc_model` (else QNN_COMMON_ERROR_MEM_ALLOC); an EPContext model carries
  its SoC in the context binary and loads without it;
- with `offload_graph_io_quantization=1` (the EP default) the graph-output DequantizeLinear runs on
  the CPU EP; "0" keeps graph I/O (de)quantization inside the context.
Provider options: onnxruntime/onnxruntime-qnn docs/execution_providers/QNN-ExecutionProvider.md
("Configuration Options").
"""

from __future__ import annotations

import platform
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from tasks.backends.base import DeviceCompileParams
from tasks.core.errors import BackendUnavailableError, ConfigError, StageError
from tasks.core.feeds import build_feeds
from tasks.core.params import StrictParams

EP_NAME = "QNNExecutionProvider"
CPU_EP = "CPUExecutionProvider"
ARTIFACT = "model_ctx.onnx"
PRECISION_KEY = "edgeopt.precision"
# An uncompiled model is finalized at load time for this SoC (Snapdragon 8 Gen 3, SM8650, HTP v75);
# compile it (the compile stage) to choose the SoC.
JIT_SOC_MODEL = 57
# Compile options this backend understands (QnnHtpCompileParams.backend_options).
REQUIRED_OPTIONS = ("soc_model", "htp_arch")
DEFAULT_OPTIONS: dict[str, Any] = {
    "embed_context": False,
    "offload_graph_io_quantization": False,
    "enable_htp_fp16_precision": True,
    "htp_graph_finalization_optimization_mode": 3,
    "vtcm_mb": 0,
}

class QnnSoc(StrictParams):
    """One Qualcomm SoC as QNN names it: the `soc_model` and `htp_arch` provider options."""

    chipset: str = Field(description="Qualcomm part number, for the record")
    soc_model: int = Field(gt=0, description="QNN Qnn_SocModel_t value")
    htp_arch: int = Field(ge=68, description="Hexagon HTP architecture (QnnHtpDevice_Arch_t): 68, 69, 73, 75, 79, 81")


# soc_model: Qnn_SocModel_t in the QNN SDK header include/QNN/QnnTypes.h (SM8550 = 43, SM8650 = 57,
#   SC8380XP = 60, SM8750 = 69; e.g. the copy in github.com/chuzcjoe/qnnx). The ONNX Runtime QNN EP
#   docs point to the QAIRT "supported Snapdragon devices" table for the same numbers.
# htp_arch: Qualcomm's SoC table in google-ai-edge/LiteRT litert/vendors/qualcomm/core/schema/soc_table.cc
#   (SM8550 V73, SM8650 V75, SM8750 V79, SC8380XP V73); Olive's QAIRT pass documents the X Elite as
#   'dsp_arch:v73;soc_model:60' (olive/passes/qairt/gen_ai_builder.py).
# Snapdragon X Elite: SC8380XP was renamed X1E80100 (linux-arm-msm, Nov 2023: "refers to the exact same
#   SoC"); QNN keeps the SC8380XP name.
QNN_SOCS: dict[str, QnnSoc] = {
    "snapdragon_8_gen_2": QnnSoc(chipset="SM8550", soc_model=43, htp_arch=73),
    "snapdragon_8_gen_3": QnnSoc(chipset="SM8650", soc_model=57, htp_arch=75),
    "snapdragon_8_elite": QnnSoc(chipset="SM8750", soc_model=69, htp_arch=79),
    "snapdragon_x_elite": QnnSoc(chipset="X1E80100 (SC8380XP)", soc_model=60, htp_arch=73),
}


class QnnHtpCompileParams(DeviceCompileParams):
    targets: dict[str, QnnSoc] = Field(
        default_factory=lambda: dict(QNN_SOCS), description="SoC name -> QNN soc_model/htp_arch"
    )
    embed_context: bool = Field(False, description="context binary inside the ONNX file (one file) or beside it")
    offload_graph_io_quantization: bool = Field(
        False, description="true: graph-input Q / output DQ run on the CPU EP (the EP default); false: in the context"
    )
    enable_htp_fp16_precision: bool = Field(True, description="run fp32 models in fp16 (HTP has no fp32 path)")
    htp_graph_finalization_optimization_mode: Literal[0, 1, 2, 3] = Field(
        3, description="0 default, 1 fastest prepare, 3 slowest prepare / most optimal graph"
    )
    vtcm_mb: int = Field(0, ge=0, description="VTCM size in MB; 0 = the SoC's default")

    def check_target(self, target: str) -> None:
        if target not in self.targets:
            raise ConfigError(
                f"compile.qnn_htp: unknown target SoC {target!r}; known: {', '.join(sorted(self.targets))} "
                "(add one under compile.qnn_htp.targets)"
            )

    def backend_options(self, target: str | None, threads: int) -> dict[str, Any]:
        # The HTP runs the graph itself; host threads only matter for the verification sessions.
        self.check_target(target)
        soc = self.targets[target]
        return {
            "soc_model": soc.soc_model,
            "htp_arch": soc.htp_arch,
            "embed_context": self.embed_context,
            "offload_graph_io_quantization": self.offload_graph_io_quantization,
            "enable_htp_fp16_precision": self.enable_htp_fp16_precision,
            "htp_graph_finalization_optimization_mode": self.htp_graph_finalization_optimization_mode,
            "vtcm_mb": self.vtcm_mb,
        }


_register_lock = threading.Lock()
_BITS = {2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 21: 4, 22: 4}  # onnx TensorProto data type -> bits


def _htp_library() -> str:
    import onnxruntime_qnn

    return onnxruntime_qnn.get_qnn_htp_path()


def qnn_devices() -> list:
    """The QNN EP devices, registering the plugin library on first use (registering twice fails)."""
    import onnxruntime as ort
    import onnxruntime_qnn

    with _register_lock:
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
        if not devices:
            ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
            devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise BackendUnavailableError(f"onnxruntime-qnn registered but offers no {EP_NAME} device")
    return devices


def is_simulator() -> bool:
    """x86-64 hosts only have the HTP simulator; Snapdragon hosts (arm64) have the NPU."""
    return platform.machine().lower() in ("x86_64", "amd64")


def qnn_versions() -> dict[str, str]:
    import onnxruntime as ort
    import onnxruntime_qnn

    return {
        "onnxruntime": ort.__version__,
        "onnxruntime-qnn": metadata.version("onnxruntime-qnn"),
        "qnn_sdk": getattr(onnxruntime_qnn.build_and_package_info, "qnn_version", "unknown"),
    }


def _session_options(provider_options: dict[str, str], *, threads: int, allow_cpu_fallback: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: the plugin warns about Windows-only features on every session
    options.add_provider_for_devices(qnn_devices(), {"backend_path": _htp_library(), **provider_options})
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if allow_cpu_fallback else "1")
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return options


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else exc.__class__.__name__)[:300]


def model_precision(model, fp16: bool = True) -> str:
    """`a16w8`-style label from a QDQ graph: activation bits from QuantizeLinear zero points, weight
    bits from DequantizeLinear nodes fed by initializers (32-bit biases ignored); else fp16/fp32.
    MatMul/Gemm nodes a QDQ graph leaves in float (not DQ inputs -> op -> Q output) run in fp16 on
    the HTP, and the label says how many (e.g. `a16w8 + fp16 MatMul x12`)."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    acts, weights, float_matmuls = Counter(), Counter(), 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            acts[_BITS.get(inits[node.input[2]], 0)] += 1
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            bits = _BITS.get(inits[node.input[0]], 0)
            if bits != 32:
                weights[bits] += 1
        elif node.op_type in ("MatMul", "Gemm"):
            dq_in = all(producers.get(name) == "DequantizeLinear" for name in node.input[:2])
            q_out = consumers.get(node.output[0], []) == ["QuantizeLinear"]
            float_matmuls += not (dq_in and q_out)
    if not acts and not weights:
        return "fp16" if fp16 else "fp32"
    a = f"a{acts.most_common(1)[0][0]}" if acts else "a?"
    w = f"w{weights.most_common(1)[0][0]}" if weights else "w?"
    return a + w + (f" + {'fp16' if fp16 else 'fp32'} MatMul x{float_matmuls}" if float_matmuls else "")


def _placement(source, compiled) -> dict[str, Any]:
    """Where each source node runs, read off the compiled graph: nodes left outside EPContext nodes
    run on the CPU EP. They keep their source names, except the copies ORT makes of a DequantizeLinear
    shared by several consumers (`<name>/duplicated`), which the report marks as `copy_of` it."""
    ctx = [n for n in compiled.graph.node if n.op_type == "EPContext"]
    cpu = [n for n in compiled.graph.node if n.op_type != "EPContext"]
    cpu_names = {n.name for n in cpu}
    source_names = {n.name for n in source.graph.node}
    on_qnn = [n for n in source.graph.node if n.name not in cpu_names]

    def entry(i: int, node) -> dict[str, str]:
        name = node.name or f"<unnamed {node.op_type} #{i}>"
        copy_of = name.split("/duplicated")[0] if "/duplicated" in name else None
        return {"name": name, "op_type": node.op_type, **({"copy_of": copy_of} if copy_of in source_names else {})}

    return {
        "nodes_total": len(source.graph.node),
        "nodes_per_ep": {EP_NAME: len(on_qnn), CPU_EP: len(cpu)},
        "qnn_partitions": len(ctx),
        "qnn_op_types": dict(sorted(Counter(n.op_type for n in on_qnn).items())),
        "cpu_fallback": {
            "count": len(cpu),
            "op_types": dict(sorted(Counter(n.op_type for n in cpu).items())),
            "nodes": [entry(i, n) for i, n in enumerate(cpu)],
        },
    }


def _provider_options(options: dict[str, Any]) -> dict[str, str]:
    """Compile options (typed) -> QNN EP provider options (strings, as the EP parses them)."""
    missing = [k for k in REQUIRED_OPTIONS if k not in options]
    if missing:
        raise ValueError(f"qnn_htp compile needs options {missing}")
    unknown = sorted(set(options) - set(REQUIRED_OPTIONS) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"qnn_htp compile: unknown options {unknown}")
    o = {**DEFAULT_OPTIONS, **options}
    provider = {
        "soc_model": str(int(o["soc_model"])),
        "htp_arch": str(int(o["htp_arch"])),
        "offload_graph_io_quantization": "1" if o["offload_graph_io_quantization"] else "0",
        "enable_htp_fp16_precision": "1" if o["enable_htp_fp16_precision"] else "0",
        "htp_graph_finalization_optimization_mode": str(int(o["htp_graph_finalization_optimization_mode"])),
    }
    if int(o["vtcm_mb"]) > 0:
        provider["vtcm_mb"] = str(int(o["vtcm_mb"]))
    return provider


def _is_ep_context(model) -> bool:
    return any(n.op_type == "EPContext" for n in model.graph.node)


@dataclass
class _QnnModel:
    session: Any
    output: str
    precision: str
    simulated: bool
    placement: dict[str, int] = field(default_factory=dict)
    """Nodes per execution provider in this session (an EPContext node counts as one)."""
    cpu_nodes: list[str] = field(default_factory=list)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], build_feeds(self.session, feed))[0]


class QnnHtpBackend:
    name = "qnn_htp"
    engine_package = "onnxruntime-qnn"
    compile_params = QnnHtpCompileParams
    dynamic_shapes = False
    pins_shapes = False
    simulated = is_simulator()

    def accelerator_nodes(self, placement: dict) -> int:
        return int(placement["nodes_per_ep"].get(EP_NAME, 0))

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime_qnn
        except ImportError as exc:
            return f"onnxruntime-qnn not importable ({exc}); pip install onnxruntime-qnn"
        for lib in (onnxruntime_qnn.get_library_path(), onnxruntime_qnn.get_qnn_htp_path()):
            if not Path(lib).is_file():
                return f"onnxruntime-qnn is missing {lib}"
        try:
            qnn_devices()
        except Exception as exc:  # registration errors come from C++ as plain RuntimeError/Fail
            return f"cannot register the QNN plugin EP: {_one_line(exc)}"
        return None

    def compile(self, model: Path, out_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Compile `model` into `out_dir/model_ctx.onnx` (+ `model_ctx_qnn.bin` unless embedded).

        CPU fallback is allowed while compiling so the placement report can name what QNN rejected;
        the caller decides whether that fallback is acceptable. Returns artifact (file name), files,
        placement, compile_seconds, options (the provider options used), versions and precision.
        """
        import onnx
        import onnxruntime as ort

        model, out_dir = Path(model), Path(out_dir)
        provider = _provider_options(options)
        embed = bool(options.get("embed_context", DEFAULT_OPTIONS["embed_context"]))
        source = onnx.load(str(model), load_external_data=False)
        precision = model_precision(source, fp16=provider["enable_htp_fp16_precision"] == "1")
        out_path = out_dir / ARTIFACT
        out_dir.mkdir(parents=True, exist_ok=True)

        session_options = _session_options(provider, threads=1, allow_cpu_fallback=True)
        start = time.perf_counter()
        try:
            compiler = ort.ModelCompiler(
                session_options,
                str(model),
                embed_compiled_data_into_model=embed,
                flags=ort.OrtCompileApiFlags.ERROR_IF_NO_NODES_COMPILED,
            )
            compiler.compile_to_file(str(out_path))
        except Exception as exc:  # onnxruntime raises its own Fail/EPFail/RuntimeException types
            raise StageError(
                f"qnn_htp: compiling {model.name} for soc_model {provider['soc_model']} failed: {_one_line(exc)}"
            ) from exc
        seconds = time.perf_counter() - start

        compiled = onnx.load(str(out_path))
        ctx_nodes = [n for n in compiled.graph.node if n.op_type == "EPContext"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ctx_nodes[0].attribute} if ctx_nodes else {}
        sdk_build = attrs.get("ep_sdk_version", b"")
        versions = {
            **qnn_versions(),
            "qnn_sdk_build": sdk_build.decode() if isinstance(sdk_build, bytes) else str(sdk_build),
            "ep_compatibility_info": next(
                (p.value for p in compiled.metadata_props if p.key == f"ep_compatibility_info.{EP_NAME}"), ""
            ),
        }
        # Record the precision where `load` finds it (the context binary hides the QDQ types).
        onnx.helper.set_model_props(
            compiled, {**{p.key: p.value for p in compiled.metadata_props}, PRECISION_KEY: precision}
        )
        onnx.save(compiled, str(out_path))

        files = [ARTIFACT]
        if not embed:
            # Only the main EPContext node names the binary; the other partitions share its context.
            for node in ctx_nodes:
                for a in node.attribute:
                    if a.name == "ep_cache_context":
                        ref = onnx.helper.get_attribute_value(a)
                        ref = ref.decode() if isinstance(ref, bytes) else str(ref)
                        if ref not in files:
                            files.append(ref)
        return {
            "artifact": ARTIFACT,
            "files": files,
            "placement": _placement(source, compiled),
            "compile_seconds": seconds,
            "options": {**provider, "embed_context": embed},
            "versions": versions,
            "precision": precision,
        }

    def load(self, artifact: Path, threads: int) -> _QnnModel:
        """A session on the HTP (the simulator on x86-64) with CPU fallback disabled.

        Exception: an EPContext model whose compile step accepted CPU fallback nodes (they sit outside
        its EPContext nodes) cannot run without them, so those, and only those, run on the CPU EP.
        """
        import onnx
        import onnxruntime as ort

        artifact = Path(artifact)
        graph = onnx.load(str(artifact), load_external_data=False)
        compiled = _is_ep_context(graph)
        baked_fallback = [n.name for n in graph.graph.node if n.op_type != "EPContext"] if compiled else []
        props = {p.key: p.value for p in graph.metadata_props}
        precision = props.get(PRECISION_KEY) or model_precision(graph)
        provider = {"htp_performance_mode": "burst"}
        if not compiled:
            provider |= {"soc_model": str(JIT_SOC_MODEL), "enable_htp_fp16_precision": "1"}
        del graph

        options = _session_options(provider, threads=threads, allow_cpu_fallback=bool(baked_fallback))
        try:
            session = ort.InferenceSession(str(artifact), options)
        except Exception as exc:
            hint = "" if compiled else "; compile it (the compile stage) to see which nodes QNN rejects"
            raise StageError(f"qnn_htp: cannot load {artifact} on the HTP: {_one_line(exc)}{hint}") from exc
        placement: Counter = Counter()
        cpu_nodes = []
        for subgraph in session.get_provider_graph_assignment_info():
            nodes = subgraph.get_nodes()
            placement[subgraph.ep_name] += len(nodes)
            if subgraph.ep_name != EP_NAME:
                cpu_nodes += [n.name for n in nodes]
        if not placement.get(EP_NAME):
            raise StageError(f"qnn_htp: {artifact} placed no node on {EP_NAME}; is it a QNN model?")
        label = f"{precision} (HTP simulator)" if self.simulated else f"{precision} (HTP)"
        if cpu_nodes:
            label += f" + {len(cpu_nodes)} CPU fallback nodes"
        return _QnnModel(
            session=session,
            output=session.get_outputs()[0].name,
            precision=label,
            simulated=self.simulated,
            placement=dict(placement),
            cpu_nodes=cpu_nodes,
        )


BACKEND = QnnHtpBackend()
