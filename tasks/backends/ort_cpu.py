"""ONNX Runtime on the CPU execution provider."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class _OrtModel:
    session: object
    output: str
    precision: str

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        from tasks.graph_surgery import build_feeds

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


class OrtCpuBackend:
    name = "ort_cpu"
    engine_package = "onnxruntime"

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return f"onnxruntime not importable: {exc}"
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CPUExecutionProvider"
        return None

    def load(self, artifact: Path, threads: int) -> _OrtModel:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        return _OrtModel(session=session, output=session.get_outputs()[0].name, precision=_precision(Path(artifact)))


BACKEND = OrtCpuBackend()
