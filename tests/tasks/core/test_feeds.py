"""build_feeds: model feeds from tokenizer samples, also for a graph_surgery model with float mask inputs."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from tasks.core.errors import InputError
from tasks.core.feeds import build_feeds
from tasks.families.sentence_encoder import FAMILY
from tasks.transforms import surgery
from tasks.transforms.surgery import GraphSurgeryParams

SEQ = 16  # the session's tiny_onnx
SENTENCES = ["a man is playing a guitar.", "two dogs are running in the street with a red ball.", "a cat."]


def test_build_feeds_rejects_inputs_it_cannot_make(tiny_onnx, tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    tokens = FAMILY.samples(AutoTokenizer.from_pretrained(tiny_bert), SENTENCES, SEQ)
    proto, _ = surgery.apply(onnx.load(tiny_onnx), GraphSurgeryParams(float_mask_input=True), tmp_path)
    model = tmp_path / "surgery.onnx"
    onnx.save(proto, model)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with pytest.raises(InputError, match="needs 'attention_mask'"):
        build_feeds(sess, {"input_ids": tokens["input_ids"][:1], "token_type_ids": tokens["token_type_ids"][:1]})
    # The fill value travels in the model metadata, and can be overridden.
    assert build_feeds(sess, {k: v[:1] for k, v in tokens.items()})["attention_bias"].min() == -100.0
    feeds = build_feeds(onnx.load(model), {k: v[:1] for k, v in tokens.items()}, mask_fill_value=-99.0)
    assert feeds["attention_bias"].min() == -99.0
