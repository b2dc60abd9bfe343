"""What every Hugging Face text family shares: folders, tokenizers, inputs, pruned copies, checks.

Any encoder architecture `transformers` knows (BERT, RoBERTa, XLM-R, DistilBERT, MPNet, ELECTRA, ...)
loads from a folder with `config.json`, tokenizer files and weights. The exported graph takes the
tokenizer outputs the model's forward accepts, in the order `INPUT_ORDER` (a model without token types,
such as DistilBERT or MPNet, has no `token_type_ids` input), each int64 [1, L].
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.errors import InputError
from tasks.families import encoder_pruning
from tasks.families.base import ExportSpec, FamilySettings, LoadedModel
from tasks.families.transformer_graph import TransformerGraphHints

INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
# Files of a model folder the pipeline keeps: config, tokenizer, weights (no *.py, which remote code would
# load), and the sentence-transformers files that say how a sentence embedder pools.
KEPT_SUFFIXES = {".json", ".txt", ".model", ".safetensors"}
SENTENCE_TRANSFORMERS_FILES = ("1_Pooling/config.json",)
# RoBERTa-style position ids start after the padding index: max_position_embeddings - (pad_token_id + 1) usable.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")

# Fixed texts the export and compile checks run: short to long, plain to odd, and one longer than
# 512 tokens so truncation is exercised at every length.
VERIFY_TEXTS = (
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    " ".join(["Long inputs are truncated to the sequence length the model was exported with."] * 60),
    "Edge devices run static graphs; every input is padded to the same length before inference.",
    "A woman is slicing an onion in the kitchen.",
    "Two dogs run across a snowy field toward their owner.",
    "The stock market fell sharply after the announcement of new tariffs on imported steel.",
    "Is the train to Lyon delayed again this morning?",
    "3 kids, 2 bikes & 1 very patient parent at the park.",
    "The cat sleeps.",
    "Researchers measured the latency of the quantized encoder on a mobile neural processor.",
    "Nobody expected the committee to approve the proposal so quickly.",
)


class HfTextFamily:
    """Base of the text families; subclasses set the model class, the output and the evaluation formats."""

    modality = "text"
    shape_axis = "sequence length (tokens)"
    shape_unit = "tokens"
    dynamic_axis = 1  # [batch, tokens]: a dynamic export frees the token axis
    prunable = True
    auto_class = "AutoModel"

    # --------------------------------------------------------------- folders

    def check_folder(self, folder: Path, config: dict, settings: FamilySettings) -> None:
        """An encoder `transformers` knows: a bidirectional architecture (one with a masked-LM form)."""
        from transformers import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        model_type = config.get("model_type")
        if model_type not in CONFIG_MAPPING or model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES \
                or config.get("is_decoder"):
            raise InputError(
                f"{folder / 'config.json'}: model_type {model_type!r} is not a supported encoder; family "
                f"{self.name} takes bidirectional encoders transformers knows (bert, roberta, xlm-roberta, "
                "distilbert, mpnet, electra, ...)"
            )

    def folder_files(self, folder: Path) -> list[Path]:
        folder = Path(folder)
        top = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in KEPT_SUFFIXES]
        return top + [folder / f for f in SENTENCE_TRANSFORMERS_FILES if (folder / f).is_file()]

    def prepare_folder(self, folder: Path, settings: FamilySettings) -> None:
        """Nothing: a text folder is used as fetched."""

    # --------------------------------------------------------------- loading

    def load_preprocessor(self, model_dir: Path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise InputError(f"{model_dir}: cannot load the tokenizer ({exc.__class__.__name__}: {str(exc)[:200]})") from exc

    def save_preprocessor(self, tokenizer, folder: Path) -> None:
        tokenizer.save_pretrained(folder)

    def load(self, model_dir: Path, settings: FamilySettings, attn_implementation: str = "eager") -> LoadedModel:
        """Tokenizer and model of an HF folder; a folder the prune stage wrote (with `prune.json`) has
        per-layer shapes HF configs cannot express, so `encoder_pruning.load_pruned` rebuilds it."""
        import transformers

        model_dir = Path(model_dir)
        tokenizer = self.load_preprocessor(model_dir)
        auto = getattr(transformers, self.auto_class)
        try:
            if encoder_pruning.read_spec(model_dir) is not None:
                model = encoder_pruning.load_pruned(model_dir, auto, attn_implementation)
            else:
                model = auto.from_pretrained(model_dir, attn_implementation=attn_implementation, use_safetensors=None)
        except (OSError, ValueError) as exc:
            raise InputError(f"{model_dir}: cannot load the model ({exc.__class__.__name__}: {str(exc)[:200]})") from exc
        except RuntimeError as exc:  # e.g. weights whose shapes do not match config.json
            what = _first_mismatch(model_dir, auto) or str(exc).strip().splitlines()[0][:200]
            raise InputError(f"{model_dir}: weights do not fit config.json ({what}); fix the model folder that "
                             "fetch_model reads (its config.json or weights)") from exc
        return LoadedModel(folder=model_dir, preprocessor=tokenizer, model=model.eval(), config=model.config)

    def max_shape(self, loaded: LoadedModel) -> int | None:
        return _max_tokens(loaded.config.to_dict())

    def check_shape(self, loaded: LoadedModel, shape: int) -> None:
        """Nothing: every length up to max_shape fits."""

    def folder_max_shape(self, folder: Path) -> int | None:
        """The largest sequence length a model folder's config.json allows (read before anything loads it)."""
        try:
            return _max_tokens(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None  # the fetch stage names what is wrong with the folder

    def export_spec(self, loaded: LoadedModel) -> ExportSpec:
        """The tokenizer outputs the model takes, in INPUT_ORDER."""
        accepted = set(inspect.signature(loaded.model.forward).parameters)
        emitted = set(loaded.preprocessor.model_input_names)
        names = [n for n in INPUT_ORDER if n in accepted and n in emitted]
        if not {"input_ids", "attention_mask"} <= set(names):
            raise InputError(
                f"{loaded.config.model_type}: the model or its tokenizer lacks input_ids/attention_mask "
                f"(tokenizer gives {sorted(emitted)}); family {self.name} needs both"
            )
        return ExportSpec(inputs=tuple(names), output=self.output_name)

    # --------------------------------------------------------------- samples

    def samples(self, tokenizer, texts: list[str], shape: int) -> dict[str, np.ndarray]:
        """Pad/truncate to the static length: int64 arrays for every name in INPUT_ORDER (token types are 0
        where the tokenizer makes none); `build_feeds` passes on those a model declares."""
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=shape, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        return {
            "input_ids": ids,
            "attention_mask": enc["attention_mask"].astype(np.int64),
            "token_type_ids": enc.get("token_type_ids", np.zeros_like(ids)).astype(np.int64),
        }

    def verify_samples(self) -> tuple[str, ...]:
        return VERIFY_TEXTS

    def synthetic_samples(self, model, shape: int) -> dict[str, np.ndarray]:
        """Token ids with padding at several lengths (L, L/2, 12, 3), drawn from the graph's vocabulary."""
        vocab = _vocab_size(model)
        rng = np.random.default_rng(0)
        lengths = sorted({shape, max(3, shape // 2), min(shape, 12), min(shape, 3)}, reverse=True)
        ids = np.zeros((len(lengths), shape), dtype=np.int64)
        mask = np.zeros_like(ids)
        low = min(1000, max(5, vocab // 4))
        for r, n in enumerate(lengths):
            ids[r, :n] = rng.integers(low, vocab, size=n)
            mask[r, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    def input_lengths(self, tokenizer, texts: list[str]) -> np.ndarray:
        """Tokens per text, special tokens included (what a static length must hold)."""
        specials = int(tokenizer.num_special_tokens_to_add(pair=False))
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return np.array([len(i) for i in ids], dtype=np.int64) + specials

    # --------------------------------------------------------------- pruning and distillation

    def pruning_layout(self, config: Any) -> encoder_pruning.EncoderLayout:
        return encoder_pruning.layout_for(config)

    def encode(self, tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
        """Token ids per text (with special tokens), truncated to max_tokens; tokenised once, batched later."""
        return tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]

    def collate(self, ids: list[list[int]], pad_id: int) -> dict:
        """One batch padded to its longest text; token_type_ids all 0 as for one text in the export (the
        export module passes on only the inputs its model takes)."""
        import torch

        input_ids = torch.full((len(ids), max(map(len, ids))), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}

    def quantization_hints(self) -> TransformerGraphHints:
        return TransformerGraphHints()


def _max_tokens(config: dict) -> int | None:
    positions = config.get("max_position_embeddings")
    if positions is None:
        return None
    if config.get("model_type") in _OFFSET_POSITIONS:
        positions -= (config.get("pad_token_id") or 0) + 1
    return int(positions)


def _vocab_size(model) -> int:
    """Rows of the word-embedding table (the Gather indexed by input_ids, through int32_inputs' Cast)."""
    inits = {i.name: i for i in model.graph.initializer}
    ids = {"input_ids"}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input[0] in ids:
            ids.add(node.output[0])
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in ids and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return 100


def _first_mismatch(model_dir: Path, auto) -> str | None:
    """The first weight whose shape differs from what config.json builds, as `name: [weights] vs [config]`
    (transformers only says "see the report above", in a log the user never sees)."""
    import transformers
    from safetensors import safe_open

    try:
        expected = auto.from_config(transformers.AutoConfig.from_pretrained(model_dir)).state_dict()
    except Exception:  # noqa: BLE001 (a config that cannot build a model has its own error; this is a hint)
        return None
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():
                # Checkpoints name tensors with or without the base model's prefix (`bert.`).
                candidates = [name, name.split(".", 1)[-1], *(f"{p}.{name}" for p in {n.split(".")[0] for n in expected})]
                target = next((c for c in candidates if c in expected), None)
                shape = list(weights.get_slice(name).get_shape())
                if target is not None and list(expected[target].shape) != shape:
                    return f"{name}: {shape} in the weights, {list(expected[target].shape)} from config.json"
    return None
