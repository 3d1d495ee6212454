"""Image preprocessing identical to the HF image processors the seeds use, in numpy/PIL.

Every architecture's processor maps one PIL image to a dict of per-row arrays (the model's image inputs:
``pixel_values`` and, for some architectures, masks or tile ids) and says what a text-only row carries
(``blank``), so batches stack the same keys for every row whatever the model.

LLaVA-1.5 (both seeds) uses CLIPImageProcessor: resize the shortest edge (PIL bicubic), center crop, rescale
by 1/255 in float64 then cast to float32, normalise with the OpenAI CLIP mean/std in float32.
LlavaImageProcessor's `do_pad` variant first pads to a square filled with the mean colour (original LLaVA
`expand2square`). The steps and their dtypes follow transformers' PIL backend so outputs match to float32
rounding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from vlmu_jax.data import idefics2_images, mllama_images, qwen2_vl_images
from vlmu_jax.data.pixels import CLIP_MEAN, CLIP_STD, rescale_normalize
from vlmu_jax.errors import InputError


@dataclass(frozen=True)
class ImageSpec:
    """What an HF `preprocessor_config.json` says, for the CLIP-style processors."""

    shortest_edge: int = 336
    crop: tuple[int, int] = (336, 336)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.BICUBIC
    do_center_crop: bool = True
    pad_to_square: bool = False

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (3, *self.crop)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ImageSpec:
        """From a preprocessor_config.json dict (CLIPImageProcessor / LlavaImageProcessor)."""
        size = cfg.get("size", {"shortest_edge": 336})
        edge = size["shortest_edge"] if "shortest_edge" in size else size["height"]
        crop = cfg.get("crop_size", {"height": edge, "width": edge})
        return cls(
            shortest_edge=edge,
            crop=(crop["height"], crop["width"]),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
            resample=cfg.get("resample", Image.BICUBIC),
            do_center_crop=cfg.get("do_center_crop", True),
            pad_to_square=cfg.get("do_pad", False),
        )


def llava_spec(image_size: int = 336, pad_to_square: bool = False) -> ImageSpec:
    """LLaVA-1.5's CLIP-ViT-L/14-336 processor, at any square size (tiny demo models use small ones)."""
    return ImageSpec(shortest_edge=image_size, crop=(image_size, image_size), pad_to_square=pad_to_square)


def _pad_to_square(image: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _shortest_edge_size(width: int, height: int, edge: int) -> tuple[int, int]:
    """(width, height) with the short side = edge and the long side truncated, as transformers computes it."""
    if width <= height:
        return edge, int(edge * height / width)
    return int(edge * width / height), edge


def preprocess(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One RGB PIL image -> float32 [3, H, W]."""
    image = image.convert("RGB")
    if spec.pad_to_square:
        image = _pad_to_square(image, spec.mean)
    image = image.resize(_shortest_edge_size(*image.size, spec.shortest_edge), resample=spec.resample)
    pixels = np.asarray(image).transpose(2, 0, 1)
    if spec.do_center_crop:
        crop_h, crop_w = spec.crop
        _, height, width = pixels.shape
        if crop_h > height or crop_w > width:
            raise ValueError(f"crop {spec.crop} larger than resized image {(height, width)}")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        pixels = pixels[:, top : top + crop_h, left : left + crop_w]
    return rescale_normalize(pixels, spec.rescale_factor, spec.mean, spec.std)


class ImageProcessor(Protocol):
    """One architecture's image inputs for one row (see the module docstring)."""

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]: ...

    def blank(self) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class ClipProcessor:
    """CLIPImageProcessor / LlavaImageProcessor: one [3, H, W] image per row."""

    spec: ImageSpec

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        return {"pixel_values": preprocess(image, self.spec)}

    def blank(self) -> dict[str, np.ndarray]:
        return {"pixel_values": np.zeros(self.spec.output_shape, np.float32)}


# image_processor_type in preprocessor_config.json -> processor factory.
PROCESSORS: dict[str, Callable[[dict[str, Any]], ImageProcessor]] = {
    "CLIPImageProcessor": lambda cfg: ClipProcessor(ImageSpec.from_hf(cfg)),
    "CLIPImageProcessorFast": lambda cfg: ClipProcessor(ImageSpec.from_hf(cfg)),
    "LlavaImageProcessor": lambda cfg: ClipProcessor(ImageSpec.from_hf(cfg)),
    "LlavaImageProcessorFast": lambda cfg: ClipProcessor(ImageSpec.from_hf(cfg)),
    **{name: mllama_images.MllamaProcessor.from_hf for name in mllama_images.PROCESSOR_TYPES},
    **{name: idefics2_images.Idefics2Processor.from_hf for name in idefics2_images.PROCESSOR_TYPES},
    **{name: qwen2_vl_images.Qwen2VLProcessor.from_hf for name in qwen2_vl_images.PROCESSOR_TYPES},
}


def image_processor(cfg: dict[str, Any]) -> ImageProcessor:
    """The processor a checkpoint's preprocessor_config.json names (CLIP when it names none)."""
    kind = cfg.get("image_processor_type", "CLIPImageProcessor")
    if kind not in PROCESSORS:
        raise ValueError(f"unsupported image_processor_type {kind!r}; supported: {sorted(PROCESSORS)}")
    return PROCESSORS[kind](cfg)


def load_image_processor(folder: str | Path, overrides: dict[str, Any] | None = None) -> ImageProcessor:
    """The processor of a checkpoint folder's preprocessor_config.json, with ``overrides`` over its fields."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        raise InputError("missing: the checkpoint folder needs its image processor config (copy the base model's, "
                         "or point config.model.path at the base model)", file=path)
    try:
        return image_processor({**json.loads(path.read_text()), **(overrides or {})})
    except (json.JSONDecodeError, ValueError) as err:  # processors reject settings they cannot reproduce
        raise InputError(str(err), file=path) from err


def row_images(processor: ImageProcessor, ref: Any) -> dict[str, np.ndarray]:
    """A row's image inputs: the processed image of ``ref`` (an ImageRef), or a text-only row's when None."""
    return processor.blank() if ref is None else processor(ref.load())
