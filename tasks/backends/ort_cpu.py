"""ONNX Runtime on the CPU execution provider."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class _OrtModel:
    session: object
    output: str
    precision: str = "fp32"

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feed)[0]


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
        return _OrtModel(session=session, output=session.get_outputs()[0].name)


BACKEND = OrtCpuBackend()
