"""Qwen2VLImageProcessor (transformers' PIL backend; Qwen2.5-VL uses the same one) in numpy/PIL, padded to a fixed
patch count.

Steps, as transformers runs them: convert to RGB; ``smart_resize`` both sides to multiples of patch * merge (28 px)
with the pixel count kept within [min_pixels, max_pixels] and the aspect ratio as close as possible (PIL bicubic);
rescale by 1/255 in float64 then cast to float32; normalise with the OpenAI CLIP mean/std in float32; cut into
patches of [C, temporal_patch_size, P, P] (a still image repeated over the temporal axis), flattened row by row
in 2x2-merge-block order; ``image_grid_thw`` = (1, H / P, W / P).

transformers concatenates the batch's patches into one ragged sequence; every row here must have one static shape,
so each row's patches are zero-padded to ``max_patches`` (the most ``max_pixels`` allows) and the model masks the
padding (see models/qwen2_vl.py). The number of image tokens depends on the image: ``image_token_count`` gives it
to the text side, which expands the prompt's one image token into that many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vlmu_jax.data.idefics2_images import to_rgb
from vlmu_jax.data.pixels import CLIP_MEAN, CLIP_STD, rescale_normalize

# image_processor_type names transformers writes for this processor (v4 slow/fast, v5 torchvision/PIL).
PROCESSOR_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) as transformers' qwen2_vl smart_resize: multiples of ``factor``, area in range."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"Qwen2-VL image {height}x{width}: aspect ratio must be below 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor  # Python's round, half to even
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class Qwen2VLProcessor:
    """One row's Qwen2-VL image inputs: ``pixel_values`` [max_patches, C*T*P*P] and ``image_grid_thw`` [3]."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> Qwen2VLProcessor:
        """From preprocessor_config.json: ``size`` {shortest_edge, longest_edge} (transformers 5) or the older
        top-level min_pixels / max_pixels, which win when both are given (transformers' order)."""
        size = cfg.get("size") or {}
        return cls(
            min_pixels=cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", 56 * 56))),
            max_pixels=cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels", 28 * 28 * 1280))),
            patch_size=cfg.get("patch_size", 14),
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            merge_size=cfg.get("merge_size", 2),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
            resample=cfg.get("resample", Image.BICUBIC),
            do_resize=cfg.get("do_resize", True),
            do_rescale=cfg.get("do_rescale", True),
            do_normalize=cfg.get("do_normalize", True),
            do_convert_rgb=cfg.get("do_convert_rgb", True),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def max_patches(self) -> int:
        """Patch slots per row: the largest grid ``max_pixels`` admits, a whole number of merge blocks."""
        return self.max_pixels // self.factor**2 * self.merge_size**2

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def resized_size(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) the image is resized to (its own size when do_resize is off)."""
        w, h = image.size
        if not self.do_resize:
            return h, w
        return smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)

    def image_token_count(self, image: Image.Image) -> int:
        """Image tokens the image becomes in the prompt: one per merged patch."""
        h, w = self.resized_size(image)
        return (h // self.factor) * (w // self.factor)

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        if self.do_convert_rgb:
            image = to_rgb(image)
        h, w = self.resized_size(image)
        if (h, w) != (image.size[1], image.size[0]):
            image = image.resize((w, h), resample=self.resample)
        x = rescale_normalize(np.asarray(image).transpose(2, 0, 1), self.rescale_factor if self.do_rescale else None,
                              self.mean if self.do_normalize else None, self.std)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        if gh % m or gw % m:
            raise ValueError(f"Qwen2-VL image of {h}x{w} is not a whole number of {self.factor} px merge blocks")
        blocks = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [bh, bw, m, m, C, P, P]
        patches = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        patches = patches.reshape(gh * gw, self.patch_dim)
        if len(patches) > self.max_patches:
            raise ValueError(f"Qwen2-VL image of {h}x{w} has {len(patches)} patches, more than the "
                             f"{self.max_patches} slots max_pixels={self.max_pixels} gives")
        out = np.zeros((self.max_patches, self.patch_dim), np.float32)
        out[: len(patches)] = patches
        return {"pixel_values": out, "image_grid_thw": np.asarray([1, gh, gw], np.int64)}

    def blank(self) -> dict[str, np.ndarray]:
        return {"pixel_values": np.zeros((self.max_patches, self.patch_dim), np.float32),
                "image_grid_thw": np.zeros((3,), np.int64)}
