"""Tiny random models saved as Hugging Face folders: no download, seconds to export.

Every encoder architecture the text families are tested on (`ARCHITECTURES`), with a tokenizer of its own
kind built from a small vocabulary, and a DistilBERT sequence classifier.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a the man woman child dog cat is are playing riding eating cutting running guitar horse "
    "piano ball street car bike water food in on of and with to his her two three large small "
    "young old red blue green"
).split()
ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")
CLASSES = ("negative", "neutral", "positive")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _wordpiece(folder: Path, special: list[str]) -> Path:
    vocab = list(dict.fromkeys([*special, *WORDS, *(f"##{c}" for c in _LETTERS), *(_LETTERS + ".,'")]))
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def make_tiny_encoder(folder: Path, model_type: str = "bert", seed: int = 0, max_positions: int = 64) -> Path:
    """A 2-layer, 2-head, 32-wide encoder of `model_type` (one of ARCHITECTURES) and its tokenizer."""
    import torch
    import transformers as hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dims = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=max_positions)
    bert_special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    torch.manual_seed(seed)
    if model_type in ("bert", "roberta", "electra"):
        vocab = _wordpiece(folder, bert_special)
        # `vocab=`: transformers 5 ignores `vocab_file=` and would map every word to [UNK].
        tokenizer = hf.BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
        size = tokenizer.vocab_size
        if model_type == "bert":
            model = hf.BertModel(hf.BertConfig(vocab_size=size, **dims))
        elif model_type == "roberta":  # positions are offset by pad_token_id + 1
            model = hf.RobertaModel(hf.RobertaConfig(
                vocab_size=size, **{**dims, "max_position_embeddings": max_positions + 2}, pad_token_id=0))
        else:  # a narrower embedding than the hidden size adds ELECTRA's embeddings_project layer
            model = hf.ElectraModel(hf.ElectraConfig(vocab_size=size, embedding_size=16, **dims))
    elif model_type == "distilbert":
        tokenizer = hf.DistilBertTokenizerFast(vocab=str(_wordpiece(folder, bert_special)), do_lower_case=True)
        model = hf.DistilBertModel(_distilbert_config(tokenizer.vocab_size, max_positions))
    elif model_type == "mpnet":
        vocab = [line for line in _wordpiece(folder, ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]).read_text().split("\n")
                 if line]
        tokenizer = hf.MPNetTokenizer(vocab={t: i for i, t in enumerate(vocab)})
        model = hf.MPNetModel(hf.MPNetConfig(
            vocab_size=len(vocab), **{**dims, "max_position_embeddings": max_positions + 2}, pad_token_id=1,
            relative_attention_num_buckets=32))
    elif model_type == "xlm-roberta":
        # A unigram vocabulary of (piece, score) pairs: transformers 5 builds the tokenizer without a
        # sentencepiece file.
        pieces = list(dict.fromkeys(["<s>", "<pad>", "</s>", "<unk>", *(f"\u2581{w}" for w in WORDS), *(_LETTERS + ".,'"),
                                     "\u2581", "<mask>"]))
        tokenizer = hf.XLMRobertaTokenizer(vocab=[(p, 0.0 if i < 4 else -float(i)) for i, p in enumerate(pieces)])
        model = hf.XLMRobertaModel(hf.XLMRobertaConfig(
            vocab_size=len(pieces), **{**dims, "max_position_embeddings": max_positions + 2}, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, type_vocab_size=1))
    else:
        raise ValueError(model_type)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _distilbert_config(vocab_size: int, max_positions: int, **extra):
    import transformers as hf

    return hf.DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                               max_position_embeddings=max_positions, **extra)


def make_tiny_classifier(folder: Path, seed: int = 0, max_positions: int = 64) -> Path:
    """A tiny DistilBERT sequence classifier over CLASSES (id2label names them)."""
    import torch
    import transformers as hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = hf.DistilBertTokenizerFast(vocab=str(_wordpiece(folder, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])),
                                           do_lower_case=True)
    config = _distilbert_config(tokenizer.vocab_size, max_positions, num_labels=len(CLASSES),
                                id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    torch.manual_seed(seed)
    model = hf.DistilBertForSequenceClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
