"""Family `sentence_encoder`: any Hugging Face encoder turned into one sentence embedding per text.

The exported graph runs the encoder, pools its token states over real tokens (mean, CLS or max) and
optionally L2-normalises, so the device runs the whole embedder. How to pool is read from the folder's
sentence-transformers files when present (`modules.json`, `1_Pooling/config.json`: e.g. all-MiniLM-L6-v2
is mean + Normalize, many retrieval models are CLS), else from `family.pooling` (default mean, normalised).
Scored on sentence pairs (Spearman of cosines) or retrieval (nDCG@10 / recall@10 by cosine).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.core.errors import InputError
from tasks.families.base import ExportSpec, FamilySettings, LoadedModel
from tasks.families.hf_text import HfTextFamily

_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


class SentenceEncoderSettings(FamilySettings):
    name: Literal["sentence_encoder"] = "sentence_encoder"
    pooling: Literal["auto", "mean", "cls", "max"] = Field(
        "auto", description="auto: the folder's 1_Pooling/config.json (sentence-transformers), else mean"
    )
    normalize: bool | None = Field(
        None, description="L2-normalise the embedding; null: as the folder's modules.json says, else true"
    )


def resolve_pooling(model_dir: Path, settings: SentenceEncoderSettings) -> tuple[str, bool, str]:
    """(pooling, normalize, where each came from) for a model folder."""
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    modules = []
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(f"{modules_file}: not valid JSON; fix or remove it") from exc
    types = {m.get("type") for m in modules if isinstance(m, dict)}
    pooling, source = settings.pooling, "family.pooling"
    if pooling == "auto":
        pooling, source = "mean", "default (no sentence-transformers pooling config)"
        config_file = model_dir / "1_Pooling" / "config.json"
        if _ST_POOLING in types and config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            on = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
            modes = [_MODES[k] for k in on if k in _MODES]
            if len(on) != 1 or len(modes) != 1:
                raise InputError(
                    f"{config_file}: pooling modes {on} are not one of mean, CLS or max; set family.pooling"
                )
            pooling, source = modes[0], str(config_file.relative_to(model_dir))
    normalize = settings.normalize
    if normalize is None:
        normalize = _ST_NORMALIZE in types if modules else True
        source += f"; normalize from {'modules.json' if modules else 'default'}"
    return pooling, bool(normalize), source


@cache
def _embedder_class():
    import torch

    class SentenceEmbedder(torch.nn.Module):
        """HF encoder + pooling over real tokens (+ L2 normalisation)."""

        def __init__(self, encoder, pooling: str, normalize: bool, token_types: bool):
            super().__init__()
            self.encoder = encoder
            self.pooling = pooling
            self.normalize = normalize
            self.token_types = token_types

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None and self.token_types:
                inputs["token_type_ids"] = token_type_ids
            # Keyword call: positional args collide with `use_cache` in transformers 5.x.
            hidden = self.encoder(**inputs).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                if self.pooling == "mean":
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                else:
                    pooled = (hidden + (mask - 1) * 1e9).max(dim=1).values
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled

    return SentenceEmbedder


class SentenceEncoderFamily(HfTextFamily):
    name = "sentence_encoder"
    settings = SentenceEncoderSettings
    output_kind = "embedding"
    output_name = "embedding"
    eval_formats = ("sentence_pairs", "retrieval")

    def export_module(self, loaded: LoadedModel, settings: SentenceEncoderSettings) -> tuple[object, ExportSpec]:
        pooling, normalize, _ = resolve_pooling(loaded.folder, settings)
        spec = self.export_spec(loaded)
        module = _embedder_class()(loaded.model, pooling, normalize, "token_type_ids" in spec.inputs)
        return module.eval(), spec

    def describe_export(self, model_dir: Path, settings: SentenceEncoderSettings) -> dict:
        pooling, normalize, source = resolve_pooling(model_dir, settings)
        return {"pooling": pooling, "normalize": normalize, "pooling_from": source}

    def class_names(self, model_dir: Path) -> None:
        return None

    def distill_loss(self, settings, module):
        """1 - cosine (+ MSE) between student and teacher embeddings, weighted by the distill settings."""
        import torch

        def loss(student, teacher):
            if module.normalize:  # unit vectors: the dot product is the cosine
                cos = (student * teacher).sum(dim=1)
            else:
                cos = torch.nn.functional.cosine_similarity(student, teacher, dim=1)
            value = settings.cosine_weight * (1 - cos).mean()
            if settings.mse_weight:
                value = value + settings.mse_weight * torch.nn.functional.mse_loss(student, teacher)
            return value

        return loss


FAMILY = SentenceEncoderFamily()
