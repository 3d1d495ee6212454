"""Mllama (Llama-3.2-Vision) image preprocessing in numpy/PIL, as transformers' MllamaImageProcessor (PIL
backend) computes it.

One image -> the best canvas of at most ``max_image_tiles`` tiles of ``size`` x ``size`` (the smallest
upscale that fits, else the largest downscale; ties -> the smallest area), resized keeping its aspect ratio
(PIL, bilinear by default), zero-padded at the bottom/right to the canvas, rescaled (float64 -> float32),
normalised and split into tiles row-major. ``aspect_ratio_ids`` is 1 + the index of the tile grid
(rows, cols) in the supported list (0 = no image) and ``aspect_ratio_mask`` marks the used tiles (tile 0
always set, as HF's batch padding does). One image per row: unused tiles hold zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from vlmu_jax.data.pixels import CLIP_MEAN, CLIP_STD, rescale_normalize


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (a, b) with a * b <= max_tiles, a-major: HF's id order (id = index + 1)."""
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def optimal_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(canvas_height, canvas_width): the tile grid that needs the least scaling of the image."""
    canvases = np.asarray(supported_aspect_ratios(max_tiles)) * tile
    heights, widths = canvases.T
    scale_h, scale_w = heights / height, widths / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = np.min(up) if len(up) else np.max(scales[scales < 1])
    options = canvases[scales == chosen]
    best = options[np.argmin(options[:, 0] * options[:, 1])] if len(options) > 1 else options[0]
    return int(best[0]), int(best[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(new_height, new_width) of the image inside the canvas, aspect ratio kept, never below one tile side
    (unless the image is smaller and fits)."""
    target_w = int(np.clip(width, tile, canvas_w))
    target_h = int(np.clip(height, tile, canvas_h))
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class MllamaProcessor:
    """MllamaImageProcessor: ``pixel_values`` [T, 3, S, S], ``aspect_ratio_ids`` [], ``aspect_ratio_mask`` [T]
    (T = max_image_tiles)."""

    tile_size: int = 560
    max_tiles: int = 4
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.BILINEAR

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> MllamaProcessor:
        size = cfg.get("size", {"height": 560, "width": 560})
        if size.get("height") != size.get("width"):
            raise ValueError(f"MllamaImageProcessor needs a square tile size, got {size}")
        if not cfg.get("do_pad", True) or not cfg.get("do_resize", True):
            raise ValueError("MllamaImageProcessor supports only do_pad=True and do_resize=True")
        if not cfg.get("do_rescale", True) or not cfg.get("do_normalize", True):
            raise ValueError("MllamaImageProcessor: do_rescale=False / do_normalize=False are not supported")
        return cls(
            tile_size=int(size["height"]),
            max_tiles=int(cfg.get("max_image_tiles", 4)),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
            resample=cfg.get("resample", Image.BILINEAR),
        )

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        image = image.convert("RGB")
        width, height = image.size
        s = self.tile_size
        canvas_h, canvas_w = optimal_canvas(height, width, self.max_tiles, s)
        rows, cols = canvas_h // s, canvas_w // s
        new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, s)
        pixels = np.asarray(image.resize((new_w, new_h), resample=self.resample)).transpose(2, 0, 1)
        canvas = np.zeros((3, canvas_h, canvas_w), pixels.dtype)
        canvas[:, :new_h, :new_w] = pixels
        normed = rescale_normalize(canvas, self.rescale_factor, self.mean, self.std)
        tiles = normed.reshape(3, rows, s, cols, s).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
        out = self.blank()
        out["pixel_values"][: rows * cols] = tiles
        out["aspect_ratio_ids"] = np.asarray(supported_aspect_ratios(self.max_tiles).index((rows, cols)) + 1,
                                             np.int32)
        out["aspect_ratio_mask"][: rows * cols] = 1
        return out

    def blank(self) -> dict[str, np.ndarray]:
        """A text-only row: no tiles, aspect ratio id 0 (HF's padding id), tile 0 marked as HF pads it."""
        mask = np.zeros((self.max_tiles,), np.int32)
        mask[0] = 1
        return {
            "pixel_values": np.zeros((self.max_tiles, 3, self.tile_size, self.tile_size), np.float32),
            "aspect_ratio_ids": np.asarray(0, np.int32),
            "aspect_ratio_mask": mask,
        }


# image_processor_type names transformers writes for this processor (v4 slow/fast, v5 torchvision/PIL).
PROCESSOR_TYPES = (
    "MllamaImageProcessor",
    "MllamaImageProcessorFast",
    "MllamaImageProcessorPil",
)
