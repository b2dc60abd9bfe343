"""Model feeds from preprocessed samples: what every engine calls before running a model.

A family's preprocessing (a tokenizer, an image transform) yields arrays named like the exported model's
inputs (`input_ids`, `attention_mask`, `pixel_values`, ...), [N, ...] each. Graph surgery may change what
a model declares: integer inputs retyped to int32, or the attention-mask chain replaced by float inputs
`attention_bias` [N, 1, 1, L] (0 for real tokens, the fill value for padding; the fill value is stored in
the model metadata under `META_FILL`) and `pooling_mask` (the float mask in the shape the model declares).
`build_feeds` turns the samples into exactly the declared inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from tasks.core.errors import InputError
from tasks.core.onnx_graph import input_specs

MASK_INPUT = "attention_mask"
BIAS_INPUT = "attention_bias"
POOLING_INPUT = "pooling_mask"
META_FILL = "edgeopt.attention_bias_fill"


def build_feeds(
    model_inputs,
    samples: Mapping[str, np.ndarray],
    *,
    mask_fill_value: float | None = None,
) -> dict[str, np.ndarray]:
    """Feeds for the model's declared inputs from preprocessed `samples`.

    `model_inputs`: an onnxruntime InferenceSession, an onnx ModelProto, a model path or a list of
    NodeArg-like objects. The batch dimension N is kept (slice rows yourself for a static batch of 1).
    Inputs present in `samples` are cast to the declared dtype; `attention_bias` / `pooling_mask` are made
    from `attention_mask`, the fill value from `mask_fill_value`, else the model metadata.
    """
    specs, meta = input_specs(model_inputs)
    feeds = {}
    mask = samples.get(MASK_INPUT)
    for spec in specs:
        name, dtype, shape = spec.name, spec.dtype, spec.shape
        if name in samples:
            feeds[name] = np.asarray(samples[name]).astype(dtype, copy=False)
        elif name in (BIAS_INPUT, POOLING_INPUT):
            if mask is None:
                raise InputError(f"build_feeds: model input {name!r} needs {MASK_INPUT!r} in the samples")
            mask = np.asarray(mask)
            n, length = mask.shape
            if len(shape) and shape[-1] not in (None, length) and name == BIAS_INPUT:
                raise InputError(f"build_feeds: {name} expects length {shape[-1]}, samples have {length}; re-tokenize")
            if name == BIAS_INPUT:
                fill = mask_fill_value if mask_fill_value is not None else meta.get(META_FILL)
                if fill is None:
                    raise InputError(
                        f"build_feeds: model input {BIAS_INPUT!r} but no fill value in its metadata; pass mask_fill_value"
                    )
                arr = np.where(mask.reshape(n, 1, 1, length) > 0, 0.0, float(fill))
            else:
                rest = list(shape[1:])
                if any(d is None for d in rest) or math.prod(rest) != length:
                    raise InputError(f"build_feeds: cannot shape a [{n}, {length}] mask as {name} {list(shape)}")
                arr = mask.reshape([n, *rest])
            feeds[name] = arr.astype(dtype)
        else:
            raise InputError(f"build_feeds: model input {name!r} cannot be built from samples {sorted(samples)}")
    return feeds
