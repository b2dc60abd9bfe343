"""What the NNCF recipes share: saving an OpenVINO IR reproducibly and counting its quantization ops."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path


def save_ir(model, out: Path) -> None:
    """Save an OpenVINO model as IR (fp32 weights kept as they are), with reproducible layer names.

    OpenVINO names each op it creates `<Type>_<n>` from a process-wide counter, so the same model saved
    by two processes (or twice in one) differs in those names only; they are renumbered by position.
    """
    import openvino as ov

    for index, op in enumerate(model.get_ordered_ops()):
        kind = op.get_type_name()
        if re.fullmatch(rf"{re.escape(kind)}_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{kind}_{index}")
    ov.save_model(model, str(out), compress_to_fp16=False)


def ir_quant_counts(path: Path) -> dict[str, int]:
    """FakeQuantize ops (activation+weight quantization) and low-bit weight constants in an IR."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    fake = 0
    low_bit = Counter()
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            fake += 1
        elif kind == "Constant":
            et = op.get_output_element_type(0).get_type_name()
            if et in ("u8", "i8", "u4", "i4"):
                low_bit[et] += 1
    return {"fake_quantize_ops": fake, "low_bit_weight_constants": dict(sorted(low_bit.items()))}


