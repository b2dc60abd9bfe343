"""Tiny random encoders saved as Hugging Face folders: no download, seconds to export."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a the man woman child dog cat is are playing riding eating cutting running guitar horse "
    "piano ball street car bike water food in on of and with to his her two three large small "
    "young old red blue green"
).split()


def make_tiny_encoder(folder: Path, model_type: str = "bert", seed: int = 0, max_positions: int = 64) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast, RobertaConfig, RobertaModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    vocab += list("abcdefghijklmnopqrstuvwxyz.,'")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    dims = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    if model_type == "bert":
        model = BertModel(BertConfig(**dims))
    elif model_type == "roberta":
        # RoBERTa offsets positions by pad_token_id + 1.
        model = RobertaModel(RobertaConfig(**{**dims, "max_position_embeddings": max_positions + 2}, pad_token_id=0))
    else:
        raise ValueError(model_type)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
