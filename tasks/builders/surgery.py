"""Graph surgery: the transformations of `tasks.transforms.surgery` applied to an export and checked on the
family's synthetic samples (the fp32 outputs must not change beyond float noise)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.errors import InputError, StageError
from tasks.core.onnx_graph import load_model
from tasks.families import FAMILIES
from tasks.families.base import FamilySettings
from tasks.transforms import surgery
from tasks.transforms.surgery import GraphSurgeryParams

TOOLS = ("onnx", "onnxruntime", "numpy")
MODEL = "model.onnx"
DYNAMIC_MODEL = "model_dynamic.onnx"  # an export's free-axis model (catalog.DYNAMIC_ONNX), rewritten alike


def static_shape(proto, model: Path) -> int:
    """The shape the model was exported at: the last dimension of its first input."""
    first = proto.graph.input[0]
    dims = first.type.tensor_type.shape.dim
    if not dims or not dims[-1].dim_value:
        raise InputError(f"{model}: input {first.name} has no static last dimension; export_onnx writes static models")
    return int(dims[-1].dim_value)


def rewrite(model: Path, params: GraphSurgeryParams, family: FamilySettings, out: Path, tmp: Path,
            shape: int | None = None) -> dict[str, Any]:
    """The transformations applied to `model`, saved to `out` and checked against `model` on samples of `shape`
    (default: the length the model was exported at; a dynamic export has none and is checked at its static
    sibling's)."""
    import onnx

    proto = load_model(Path(model), check=True, hint="pass the model.onnx written by export_onnx")
    shape = static_shape(proto, model) if shape is None else shape
    inputs_before = surgery.input_info(proto.graph)
    proto, report = surgery.apply(proto, params, tmp)
    onnx.save(proto, out)
    samples = FAMILIES.get(family.name).synthetic_samples(proto, shape)
    min_cos = surgery.compare(model, out, samples)
    if min_cos < params.verify_min_cosine:
        raise StageError(
            f"graph_surgery: output cosine to the input model {min_cos:.7f} < verify_min_cosine "
            f"{params.verify_min_cosine} with {list(report)}; disable transformations one at a time to find the culprit"
        )
    return {
        "seq_len": shape,
        "transformations": report,
        "inputs_before": inputs_before,
        "inputs": surgery.input_info(proto.graph),
        "outputs": [o.name for o in proto.graph.output],
        "nodes": len(proto.graph.node),
        "verify_min_cosine": min_cos,
        "verify_rows": int(len(next(iter(samples.values())))),
    }
