"""Stage reference: the dense fp32 model's outputs on held-out samples, what every variant is compared against.

Reads: the dense fp32 export for one shape, the model folder (its preprocessor) and the evaluation sets the
reference serves: the first configured set, and every set scored against the fp32 outputs (`images`: top-1
agreement). Writes: `<out>/outputs.npy` for the first `reference.samples` inputs of the first set (in the
set's order, see `tasks.data.evaluation`; every input when it is an agreement set) followed by every input of
each other agreement set, computed by ONNX
Runtime on the CPU in a worker process, `<out>/reference_sets.json` (the rows of each set) and
`<out>/stage.json`. A separate stage, so that every benchmark target (fp32 on ORT CPU included) depends on
it and none depends on another target.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from pydantic import Field

from tasks.backends.worker import launch_worker
from tasks.core.fingerprint import atomic_output_dir, file_sha256, write_stamp
from tasks.core.params import StrictParams
from tasks.data import evaluation
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings

TOOLS = ("onnxruntime", "transformers", "numpy")
OUTPUTS = "outputs.npy"
REFERENCE_DEVICE = "ort_cpu"


class ReferenceParams(StrictParams):
    samples: int = Field(500, ge=8, description="first inputs of the first evaluation set run by fp32 on ORT CPU")


def served_sets(sets: list[evaluation.EvalSet]) -> list[evaluation.EvalSet]:
    """The evaluation sets the reference runs: the first (the cosine columns) and those scored against fp32."""
    return [s for i, s in enumerate(sets) if i == 0 or s.needs_reference]


def run(*, model: Path, model_dir: Path, evaluation_params: evaluation.EvaluationParams, seq_len: int,
        params: ReferenceParams, family: FamilySettings, out_dir: Path, key: str) -> dict:
    """`evaluation_params`: the `served_sets` of the configured sets."""
    impl = FAMILIES.get(family.name)
    classes = impl.class_names(Path(model_dir))
    plan = evaluation.reference_plan([evaluation.load(s, classes) for s in evaluation_params.sets], params.samples)
    texts = [x for _, inputs in plan for x in inputs]
    samples = impl.samples(impl.load_preprocessor(Path(model_dir)), texts, seq_len)
    with atomic_output_dir(out_dir) as scratch, tempfile.TemporaryDirectory(prefix="edgeopt-ref-") as tmp:
        np.savez(Path(tmp) / "feeds.npz", **samples)
        launch_worker(
            {
                "backend": REFERENCE_DEVICE,
                "artifact": str(Path(model).resolve()),
                "threads": 1,
                "warmup_runs": 0,
                "timed_runs": 0,
                "feeds": str(Path(tmp) / "feeds.npz"),
                "result": str(Path(tmp) / "result.json"),
                "outputs": str(scratch / OUTPUTS),
            },
            timeout_s=3600,
        )
        evaluation.write_reference_sets(scratch, plan)
        payload = {"eval_set": plan[0][0], "samples": len(texts), "sets": {n: len(i) for n, i in plan},
                   "seq_len": seq_len, "model_sha256": file_sha256(Path(model))}
        write_stamp(scratch, key, payload)
    return payload
