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


IMAGE_ARCHITECTURES = ("resnet", "mobilenet_v2", "vit")
IMAGE_CLASSES = tuple(f"class_{i}" for i in range(10))
_IMAGE_PROCESSORS = {  # what each architecture's Hugging Face image processor config looks like, at 32 pixels
    "resnet": {"image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
               "crop_pct": 0.875, "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    "mobilenet_v2": {"image_processor_type": "MobileNetV2ImageProcessor", "do_resize": True,
                     "size": {"shortest_edge": 36}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
                     "resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "vit": {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
            "resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}


def make_tiny_image_classifier(folder: Path, architecture: str = "resnet", seed: int = 0) -> Path:
    """A tiny random image classifier of `architecture` (one of IMAGE_ARCHITECTURES) over IMAGE_CLASSES, native
    size 32, with its Hugging Face image processor config (no download)."""
    import json

    import torch
    import transformers as hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = dict(enumerate(IMAGE_CLASSES))
    common = dict(num_labels=len(IMAGE_CLASSES), id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(seed)
    if architecture == "resnet":
        model = hf.ResNetForImageClassification(hf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", downsample_in_first_stage=False,
            **common))
    elif architecture == "mobilenet_v2":  # initializer_range 0.02 gives logits ~1e-27, 0.3 logits ~20 and one class
        model = hf.MobileNetV2ForImageClassification(hf.MobileNetV2Config(
            image_size=32, depth_multiplier=0.25, min_depth=4, finegrained_output=False, tf_padding=False,
            initializer_range=0.2, **common))
    elif architecture == "vit":
        model = hf.ViTForImageClassification(hf.ViTConfig(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, **common))
    else:
        raise ValueError(architecture)
    model.eval().save_pretrained(folder)
    processor = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, **_IMAGE_PROCESSORS[architecture]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


def make_images(folder: Path, n: int, seed: int = 0, sizes=((48, 40), (40, 64), (50, 50), (72, 36))) -> list[Path]:
    """`n` seeded random RGB images (PNG) of several sizes and aspect ratios in `folder`."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
        base = np.stack([x * rng.uniform(0.2, 1), y * rng.uniform(0.2, 1), rng.uniform(0, 1) * (1 - x)], axis=-1) * 255
        pixels = np.clip(base + rng.normal(0, 30, size=base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"img_{seed}_{i:03d}.png")
        Image.fromarray(pixels, "RGB").save(paths[-1])
    return paths
