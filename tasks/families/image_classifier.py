"""Family `image_classifier`: a Hugging Face image classifier (`AutoModelForImageClassification`: ResNet,
MobileNetV2, EfficientNet, ConvNeXt, ViT, ...), or a plain-PyTorch classifier fetched with `source:
torch_package` (built from its architecture callable, weights loaded strictly: tasks.families.torch_package).

The exported graph takes `pixel_values` float32 [1, 3, S, S] (NCHW) and gives the class logits; `seq_lens`
are square image sizes S in pixels. Preprocessing is edgeopt's own spec, `preprocess.json` in the model
folder (`family.preprocess` when set, else converted from the folder's Hugging Face `preprocessor_config.json`
when the model is fetched), applied
with PIL and numpy at any S: resize (the short side to floor(S / crop_pct), then a centre crop of S; or
`squash` to S x S), scale to 0-1, normalise by mean/std, CHW. The same spec runs in calibration, evaluation,
benchmark and the deployed bundle, which therefore needs no transformers. Shapes are static only; images are
resized, never truncated, so every image has input length 0 (no shape routes by size). Scored on labelled
images (top-1/top-5 accuracy) or, without labels, on top-1 agreement with the fp32 model.

Pruning removes whole convolution output channels (tasks.families.channel_pruning); a pruned folder holds the
dense config.json, the pruned weights and prune.json, and loads by rebuilding the dense architecture, slicing
it to the recorded channels and loading the weights strictly. Recovery distils the class distribution (KL
divergence at a temperature) on the calibration images, optionally on seeded random views of them (`augment`).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np

from pydantic import Field

from tasks.core.errors import InputError
from tasks.core.params import StrictParams
from tasks.families import channel_pruning, torch_package
from tasks.families.base import ExportSpec, FamilySettings, LoadedModel

PREPROCESS = "preprocess.json"
HF_PREPROCESSOR = "preprocessor_config.json"
INPUT = "pixel_values"
OUTPUT = "logits"
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
KEPT_SUFFIXES = {".json", ".safetensors"}
# Distillation views (`augment`): a crop of this share of the image's area (uniform), of an aspect ratio between
# these (log-uniform), flipped left-right with probability FLIP (the usual Inception-style crop, made gentler).
VIEW_AREA = (0.35, 1.0)
VIEW_ASPECT = (3 / 4, 4 / 3)
VIEW_FLIP = 0.5
VIEW_TRIES = 10


class PreprocessSettings(StrictParams):
    """preprocess.json written at fetch (see Preprocess), for a folder without a Hugging Face image processor."""

    resize: Literal["shortest_edge", "squash"] = "shortest_edge"
    crop_pct: float = Field(0.875, gt=0, le=1)
    resample: Literal["nearest", "lanczos", "bilinear", "bicubic", "box", "hamming"] = "bilinear"
    mean: tuple[float, float, float] = Field(description="on the 0-1 scale; (x-127)/128 is mean 127/255, std 128/255")
    std: tuple[float, float, float] = Field(description="on the 0-1 scale")

    def spec(self) -> Preprocess:
        return Preprocess(self.resize, self.crop_pct, self.resample, self.mean, self.std)


class ImageClassifierSettings(FamilySettings):
    name: Literal["image_classifier"] = "image_classifier"
    preprocess: PreprocessSettings | None = Field(
        None, description="the preprocessing written to preprocess.json at fetch (needed for source: torch_package); "
                          "null: converted from the folder's preprocessor_config.json")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes `pixel_values` at any square size S (the contents of preprocess.json)."""

    resize: Literal["shortest_edge", "squash"]
    """shortest_edge: the short side to floor(S / crop_pct) (aspect kept), then a centre crop S x S;
    squash: straight to S x S (aspect not kept, no crop)."""
    crop_pct: float
    resample: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    """On the 0-1 scale (pixel / 255)."""
    channel_order: Literal["RGB"] = "RGB"

    def resized_short_side(self, size: int) -> int:
        return int(math.floor(size / self.crop_pct + 1e-6))

    def apply(self, image, size: int) -> np.ndarray:
        """float32 [3, S, S] of an RGB PIL image."""
        from PIL import Image

        method = getattr(Image.Resampling, self.resample.upper())
        if self.resize == "squash":
            image = image.resize((size, size), method)
        else:
            short = self.resized_short_side(size)
            width, height = image.size
            if width <= height:
                target = (short, int(short * height / width))
            else:
                target = (int(short * width / height), short)
            if target != image.size:
                image = image.resize(target, method)
            left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        pixels = (pixels - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def from_hf(config: dict, path: Path) -> Preprocess:
    """The spec of a Hugging Face image processor config (ViT, ConvNeXt, MobileNet, EfficientNet, ResNet...)."""
    where = f"{path}: image processor"
    if config.get("do_rescale", True) and not math.isclose(config.get("rescale_factor", 1 / 255), 1 / 255):
        raise InputError(f"{where} rescales by {config['rescale_factor']} (not 1/255); write {PREPROCESS} by hand")
    if not config.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = tuple(config.get("image_mean", ())), tuple(config.get("image_std", ()))
    if len(mean) != 3 or len(std) != 3:
        raise InputError(f"{where} has no 3-channel image_mean/image_std; write {PREPROCESS} by hand")
    size = config.get("size") or {}
    resample = _RESAMPLE.get(config.get("resample", 2), "bilinear")
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        crop = config.get("crop_size") or {}
        if "crop_pct" in config and config["crop_pct"] is not None:  # ConvNeXt: crop the short side's centre...
            if edge >= 384:  # ... below 384 px; from 384 up it resizes straight to the square
                return Preprocess("squash", 1.0, resample, mean, std)
            crop_pct = float(config["crop_pct"])
        elif config.get("do_center_crop") and crop.get("height") == crop.get("width") and crop.get("height"):
            crop_pct = int(crop["height"]) / edge
        else:
            crop_pct = 1.0
        return Preprocess("shortest_edge", crop_pct, resample, mean, std)
    if "height" in size and size.get("height") == size.get("width"):
        crop = config.get("crop_size") or {}
        if config.get("do_center_crop") and (crop.get("height"), crop.get("width")) != (size["height"], size["width"]):
            raise InputError(f"{where} crops {crop} out of the resized {size}; write {PREPROCESS} by hand")
        return Preprocess("squash", 1.0, resample, mean, std)
    raise InputError(f"{where} size {size} is neither a shortest edge nor a square; write {PREPROCESS} by hand")


def read_spec(path: Path) -> Preprocess:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        spec = Preprocess(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: not a preprocessing spec ({exc.__class__.__name__}: {str(exc)[:120]}); "
                         "fix it or delete it to convert preprocessor_config.json again") from exc
    if spec.resize not in ("shortest_edge", "squash") or not 0 < spec.crop_pct <= 1 or spec.resample not in _RESAMPLE.values():
        raise InputError(f"{path}: resize must be shortest_edge or squash, crop_pct in (0, 1] and resample one of "
                         f"{sorted(_RESAMPLE.values())}")
    return spec


@cache
def _classifier_class():
    import torch

    class ImageClassifier(torch.nn.Module):
        """An image classifier returning its logits only: an HF model's `.logits` (a ViT at another size
        interpolates its positions), or a plain torch model's output."""

        def __init__(self, model, native_size: int | None, interpolates: bool, hf: bool):
            super().__init__()
            self.model = model
            self.native_size = native_size
            self.interpolates = interpolates
            self.hf = hf

        def forward(self, pixel_values):
            if not self.hf:
                return self.model(pixel_values)
            extra = {}
            if self.interpolates and pixel_values.shape[-1] != self.native_size:
                extra["interpolate_pos_encoding"] = True
            return self.model(pixel_values=pixel_values, **extra).logits

    return ImageClassifier


def _verify_images() -> list:
    """12 deterministic RGB images of several aspect ratios (gradients plus seeded noise)."""
    from PIL import Image

    rng = np.random.default_rng(13)
    images = []
    for i, (w, h) in enumerate([(64, 64), (96, 48), (40, 80), (33, 47), (128, 72), (50, 50),
                                (81, 61), (24, 90), (70, 35), (45, 45), (100, 100), (37, 29)]):
        x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
        base = np.stack([x, y, (x + y) / 2 if i % 2 else 1 - x * y], axis=-1) * 255
        pixels = np.clip(base + rng.normal(0, 20 + 5 * i, size=base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


class ImageClassifierFamily:
    name = "image_classifier"
    settings = ImageClassifierSettings
    modality = "image"
    shape_axis = "image size (pixels, square)"
    shape_unit = "px"
    dynamic_axis = None
    output_kind = "logits"
    eval_formats = ("image_folder", "labelled_images", "images")
    prunable = True

    # --------------------------------------------------------------- folders

    def check_folder(self, folder: Path, config: dict, settings: FamilySettings) -> None:
        """An image classifier transformers knows, or a torch_package folder, with a preprocessing spec (ours or
        the HF processor's)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

        model_type = config.get("model_type")
        if model_type == torch_package.MODEL_TYPE:
            torch_package.check_config(config, folder / "config.json")
            self.load_preprocessor(folder)
            return
        heads = [a for a in config.get("architectures") or [] if a.endswith("ForImageClassification")]
        if model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES or not heads:
            raise InputError(
                f"{folder / 'config.json'}: model_type {model_type!r} with architectures {config.get('architectures')} "
                "is not an image classifier transformers knows (a ...ForImageClassification of resnet, mobilenet_v2, "
                "efficientnet, convnext, vit, ...)"
            )
        self.load_preprocessor(folder)

    def folder_files(self, folder: Path) -> list[Path]:
        return [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.suffix in KEPT_SUFFIXES]

    def prepare_folder(self, folder: Path, settings: FamilySettings) -> None:
        """Record the preprocessing as preprocess.json in a fetched folder: `settings.preprocess`, else converted
        once from the HF config."""
        preprocess = settings.preprocess.spec() if settings.preprocess else None
        self.save_preprocessor(preprocess or self.load_preprocessor(folder), folder)

    # --------------------------------------------------------------- loading

    def load_preprocessor(self, model_dir: Path) -> Preprocess:
        """preprocess.json, else the spec converted from the HF processor's preprocessor_config.json."""
        model_dir = Path(model_dir)
        if (model_dir / PREPROCESS).is_file():
            return read_spec(model_dir / PREPROCESS)
        hf = model_dir / HF_PREPROCESSOR
        if not hf.is_file():
            raise InputError(f"{model_dir}: no {PREPROCESS} or {HF_PREPROCESSOR}; add the model's image processor config")
        try:
            config = json.loads(hf.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(f"{hf}: not valid JSON") from exc
        return from_hf(config, hf)

    def save_preprocessor(self, preprocess: Preprocess, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)  # as save_pretrained does
        (Path(folder) / PREPROCESS).write_text(json.dumps(asdict(preprocess), indent=2) + "\n", encoding="utf-8")

    def load(self, model_dir: Path, settings: FamilySettings, attn_implementation: str = "eager") -> LoadedModel:
        from transformers import AutoModelForImageClassification

        model_dir = Path(model_dir)
        preprocess = self.load_preprocessor(model_dir)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        plan = channel_pruning.read_spec(model_dir)
        reshape = None if plan is None else (lambda model: channel_pruning.apply_plan(model, plan))
        if config.get("model_type") == torch_package.MODEL_TYPE:
            model = torch_package.load_folder(model_dir, config, reshape)
            return LoadedModel(folder=model_dir, preprocessor=preprocess, model=model, config=SimpleNamespace(**config))
        if plan is not None:
            model = self._load_pruned_hf(model_dir, plan, attn_implementation)
            return LoadedModel(folder=model_dir, preprocessor=preprocess, model=model, config=model.config)
        try:
            model = AutoModelForImageClassification.from_pretrained(model_dir, attn_implementation=attn_implementation)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
            raise InputError(f"{model_dir}: cannot load the image classifier ({first}); fix the model folder that "
                             "fetch_model reads") from exc
        return LoadedModel(folder=model_dir, preprocessor=preprocess, model=model.eval(), config=model.config)

    @staticmethod
    def _load_pruned_hf(model_dir: Path, plan: dict, attn_implementation: str):
        """A pruned HF folder: the architecture from config.json, sliced per prune.json, weights loaded strictly."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(model_dir),
                                                            attn_implementation=attn_implementation)
        channel_pruning.apply_plan(model, plan)
        path = model_dir / channel_pruning.WEIGHTS
        try:
            model.load_state_dict(load_file(str(path)), strict=True)
        except (OSError, RuntimeError, SafetensorError) as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise InputError(f"{path}: does not match {channel_pruning.PRUNE_JSON} ({first}); re-run the prune stage") from exc
        return model.eval()

    def max_shape(self, loaded: LoadedModel) -> int | None:
        return None

    def check_shape(self, loaded: LoadedModel, shape: int) -> None:
        """A patch model (ViT, ...) takes sizes that are multiples of its patch size; a torch_package model
        multiples of its `shape_multiple` (EfficientNet-Lite: 32, whose static SAME padding is exact only there)."""
        patch = getattr(loaded.config, "patch_size", None)
        if isinstance(patch, int) and shape % patch:
            raise InputError(f"seq_lens: {shape} px is not a multiple of the {loaded.config.model_type} patch size "
                             f"{patch}; use a multiple of {patch}")
        multiple = getattr(loaded.config, "shape_multiple", 1)
        if shape % multiple:
            raise InputError(f"seq_lens: {shape} px is not a multiple of {multiple}, which "
                             f"{loaded.config.architecture} needs (fetch_model.shape_multiple); use a multiple of {multiple}")

    def folder_max_shape(self, folder: Path) -> int | None:
        return None

    def export_module(self, loaded: LoadedModel, settings: FamilySettings) -> tuple[Any, ExportSpec]:
        """Logits of `pixel_values`; `.eval()` on the wrapper too (the ONNX export restores the wrapper's training
        flag recursively, which would switch batch norm to batch statistics)."""
        model = loaded.model
        hf = loaded.config.model_type != torch_package.MODEL_TYPE
        interpolates = hf and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        native = getattr(loaded.config, "image_size", None)
        return _classifier_class()(model, native, interpolates, hf).eval(), ExportSpec((INPUT,), OUTPUT)

    def describe_export(self, model_dir: Path, settings: FamilySettings) -> dict:
        return {"classes": self.class_names(model_dir), "preprocess": asdict(self.load_preprocessor(model_dir))}

    # --------------------------------------------------------------- samples

    def samples(self, preprocess: Preprocess, samples: list, shape: int) -> dict[str, np.ndarray]:
        """`pixel_values` float32 [N, 3, S, S] of image paths (relative to the project root) or PIL images."""
        from PIL import Image

        from tasks.data.images import read_image, resolve

        rows = []
        for sample in samples:
            if isinstance(sample, Image.Image):
                image = sample.convert("RGB")
            else:
                image = read_image(resolve(sample))
            rows.append(preprocess.apply(image, shape))
        return {INPUT: np.stack(rows) if rows else np.zeros((0, 3, shape, shape), dtype=np.float32)}

    def verify_samples(self) -> tuple:
        return tuple(_verify_images())

    def synthetic_samples(self, model, shape: int) -> dict[str, np.ndarray]:
        """Seeded standard-normal images (what normalised pixels look like), named as the graph's input."""
        rng = np.random.default_rng(0)
        return {model.graph.input[0].name: rng.standard_normal((4, 3, shape, shape)).astype(np.float32)}

    def class_names(self, model_dir: Path) -> list[str]:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        id2label = config.get("id2label") or {}
        return [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(id2label))]

    def input_lengths(self, preprocess: Preprocess, samples: list) -> np.ndarray:
        """Zero for every image: images are resized to any size, never truncated."""
        return np.zeros(len(samples), dtype=np.int64)

    # --------------------------------------------------------------- pruning

    def pruning_layout(self, config: Any) -> channel_pruning.ChannelLayout:
        """Convolution output channels (any CNN torch-pruning can trace; tasks.families.channel_pruning)."""
        return channel_pruning.ChannelLayout()

    def encode(self, preprocess: Preprocess, samples: list, max_shape: int) -> list:
        """`pixel_values` rows [3, S, S] of the images at S = `max_shape`."""
        return list(self.samples(preprocess, samples, max_shape)[INPUT])

    def augment(self, preprocess: Preprocess, samples: list, size: int, views: int, seed: int) -> list:
        """`views` seeded random views of every image (module constants VIEW_*), preprocessed like the originals."""
        from PIL import Image

        from tasks.data.images import read_image, resolve

        rng = np.random.default_rng(seed)
        rows = []
        for sample in samples:
            image = sample.convert("RGB") if isinstance(sample, Image.Image) else read_image(resolve(sample))
            width, height = image.size
            for _ in range(views):
                box = (0, 0, width, height)
                for _ in range(VIEW_TRIES):
                    area = width * height * rng.uniform(*VIEW_AREA)
                    aspect = math.exp(rng.uniform(math.log(VIEW_ASPECT[0]), math.log(VIEW_ASPECT[1])))
                    w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                    if 0 < w <= width and 0 < h <= height:
                        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                        box = (left, top, left + w, top + h)
                        break
                view = image.crop(box)
                if rng.uniform() < VIEW_FLIP:
                    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                rows.append(preprocess.apply(view, size))
        return rows

    def collate(self, encoded: list, pad_id: int | None = None) -> dict:
        import torch

        return {INPUT: torch.from_numpy(np.stack(encoded))}

    def distill_loss(self, settings, module):
        """KL divergence of the student's class distribution from the teacher's, at `settings.temperature`."""
        from tasks.families.distillation import kl_loss

        return kl_loss(settings.temperature)

    def quantization_hints(self) -> None:
        return None


FAMILY = ImageClassifierFamily()
