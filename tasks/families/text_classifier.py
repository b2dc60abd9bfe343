"""Family `text_classifier`: a Hugging Face sequence-classification model (`AutoModelForSequenceClassification`).

The exported graph's output is the class logits [1, num_labels]. Scored on labelled texts (accuracy or
macro F1 of the argmax; labels are the model's class names from `id2label`, or class indices). Pruning
slices the encoder under the classification head; recovery distils the class distribution (KL divergence).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Literal

from tasks.core.errors import InputError
from tasks.families.base import ExportSpec, FamilySettings, LoadedModel
from tasks.families.distillation import kl_loss
from tasks.families.hf_text import HfTextFamily


class TextClassifierSettings(FamilySettings):
    name: Literal["text_classifier"] = "text_classifier"


@cache
def _classifier_class():
    import torch

    class Classifier(torch.nn.Module):
        """HF sequence classifier returning its logits only."""

        def __init__(self, model, token_types: bool):
            super().__init__()
            self.model = model
            self.token_types = token_types

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None and self.token_types:
                inputs["token_type_ids"] = token_type_ids
            return self.model(**inputs).logits

    return Classifier


class TextClassifierFamily(HfTextFamily):
    name = "text_classifier"
    settings = TextClassifierSettings
    auto_class = "AutoModelForSequenceClassification"
    output_kind = "logits"
    output_name = "logits"
    eval_formats = ("labelled_text",)

    def check_folder(self, folder: Path, config: dict, settings: FamilySettings) -> None:
        super().check_folder(folder, config, settings)
        heads = [a for a in config.get("architectures") or [] if a.endswith("ForSequenceClassification")]
        if not heads:
            raise InputError(
                f"{folder / 'config.json'}: architectures {config.get('architectures')} has no "
                "...ForSequenceClassification head; family text_classifier needs a classifier (or use sentence_encoder)"
            )

    def export_module(self, loaded: LoadedModel, settings: TextClassifierSettings) -> tuple[object, ExportSpec]:
        spec = self.export_spec(loaded)
        return _classifier_class()(loaded.model, "token_type_ids" in spec.inputs).eval(), spec

    def describe_export(self, model_dir: Path, settings: TextClassifierSettings) -> dict:
        return {"classes": self.class_names(model_dir)}

    def class_names(self, model_dir: Path) -> list[str]:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        id2label = config.get("id2label") or {}
        return [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(id2label))]

    def distill_loss(self, settings, module):
        """KL divergence of the student's class distribution from the teacher's (at `settings.temperature`)."""
        return kl_loss(settings.temperature)


FAMILY = TextClassifierFamily()
