"""Idefics2ImageProcessor (transformers' PIL backend) in numpy/PIL, with a fixed padded size.

Steps, as transformers runs them: convert to RGB; optionally split into 4 quadrant crops + the full image
(on the uint8 image, before resizing); resize each so its longest edge is at most ``longest_edge`` (aspect
kept, the other side truncated) and both edges at least ``shortest_edge`` (PIL, ``resample``); rescale by
1/255 in float64 then cast to float32; normalise with mean/std in float32; pad bottom/right with zeros and
mark real pixels in ``pixel_attention_mask``.

transformers pads to the largest image of the batch; every row here must have the same static shape, so
images are padded to ``longest_edge x longest_edge`` (the largest a resized image can be). The model masks
padded patches out of both the vision encoder and the perceiver, and position ids depend only on the real
patch counts, so the extra padding does not change any output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vlmu_jax.data.pixels import IMAGENET_STANDARD, rescale_normalize

# image_processor_type names transformers writes for this processor (v4 slow/fast, v5 torchvision/PIL).
PROCESSOR_TYPES = ("Idefics2ImageProcessor", "Idefics2ImageProcessorFast", "Idefics2ImageProcessorPil")


def resize_output_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) after Idefics2's resize rule (transformers' get_resize_output_image_size)."""
    aspect = width / height
    if width >= height and width > longest_edge:
        width = longest_edge
        height = int(width / aspect)
    elif height > width and height > longest_edge:
        height = longest_edge
        width = int(height * aspect)
    return max(height, shortest_edge), max(width, shortest_edge)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def split_quadrants(pixels: np.ndarray) -> list[np.ndarray]:
    """[H, W, C] -> 4 quadrant crops (top-left, top-right, bottom-left, bottom-right) + the full image."""
    h, w = pixels.shape[:2]
    mh, mw = h // 2, w // 2
    return [pixels[:mh, :mw], pixels[:mh, mw:], pixels[mh:, :mw], pixels[mh:, mw:], pixels]


@dataclass(frozen=True)
class Idefics2Processor:
    """One row's Idefics2 image inputs: ``pixel_values`` [N, 3, P, P] and ``pixel_attention_mask`` [N, P, P]
    (N = 5 with image splitting, else 1; P = ``longest_edge``)."""

    shortest_edge: int = 378
    longest_edge: int = 980
    mean: tuple[float, float, float] = IMAGENET_STANDARD
    std: tuple[float, float, float] = IMAGENET_STANDARD
    rescale_factor: float = 1 / 255
    resample: int = Image.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_image_splitting: bool = False

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> Idefics2Processor:
        size = cfg.get("size", {"shortest_edge": 378, "longest_edge": 980})
        if "longest_edge" not in size or "shortest_edge" not in size:
            raise ValueError(f"Idefics2 image processor: size must give shortest_edge and longest_edge, got {size}")
        if not cfg.get("do_pad", True):
            raise ValueError("Idefics2 image processor: do_pad=False is not supported (rows need one static shape)")
        return cls(
            shortest_edge=size["shortest_edge"],
            longest_edge=size["longest_edge"],
            mean=tuple(cfg.get("image_mean", IMAGENET_STANDARD)),
            std=tuple(cfg.get("image_std", IMAGENET_STANDARD)),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
            resample=cfg.get("resample", Image.BILINEAR),
            do_resize=cfg.get("do_resize", True),
            do_rescale=cfg.get("do_rescale", True),
            do_normalize=cfg.get("do_normalize", True),
            do_convert_rgb=cfg.get("do_convert_rgb", True),
            do_image_splitting=cfg.get("do_image_splitting", False),
        )

    @property
    def images_per_row(self) -> int:
        return 5 if self.do_image_splitting else 1

    @property
    def pad_size(self) -> int:
        return self.longest_edge

    def _one(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[H, W, 3] uint8 -> padded float32 [3, P, P] and boolean mask [P, P] (HF's is int64: 8x the bytes, 40 %
        of a crop's inputs, for what the model reads as a mask; eval.batched.BatchCap counts them)."""
        if self.do_resize:
            h, w = resize_output_size(*pixels.shape[:2], self.shortest_edge, self.longest_edge)
            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), resample=self.resample))
        x = rescale_normalize(pixels.transpose(2, 0, 1), self.rescale_factor if self.do_rescale else None,
                              self.mean if self.do_normalize else None, self.std)
        _, h, w = x.shape
        p = self.pad_size
        if h > p or w > p:
            raise ValueError(f"Idefics2 image of {h}x{w} exceeds the padded size {p}x{p} (longest_edge)")
        out = np.zeros((3, p, p), np.float32)
        out[:, :h, :w] = x
        mask = np.zeros((p, p), bool)
        mask[:h, :w] = True
        return out, mask

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        if self.do_convert_rgb:
            image = to_rgb(image)
        pixels = np.asarray(image)
        crops = split_quadrants(pixels) if self.do_image_splitting else [pixels]
        values, masks = zip(*(self._one(np.ascontiguousarray(c)) for c in crops), strict=True)
        return {"pixel_values": np.stack(values), "pixel_attention_mask": np.stack(masks)}

    def blank(self) -> dict[str, np.ndarray]:
        n, p = self.images_per_row, self.pad_size
        return {
            "pixel_values": np.zeros((n, 3, p, p), np.float32),
            "pixel_attention_mask": np.zeros((n, p, p), bool),
        }

    def image_token_ids(self, image_token_id: int, num_image_tokens: int, tokenizer: Any) -> tuple[int, ...]:
        """The ids that replace the prompt's one image token (which sits between two
        ``<fake_token_around_image>`` markers in the template): with splitting transformers writes
        ``<fake>(<image>*n<fake>)*5``, i.e. 5 runs of image tokens separated by the fake token."""
        run = (image_token_id,) * num_image_tokens
        if not self.do_image_splitting:
            return run
        fake = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
        if fake is None or fake == tokenizer.unk_token_id:
            raise ValueError("image splitting needs the tokenizer's <fake_token_around_image> token")
        out: tuple[int, ...] = run
        for _ in range(self.images_per_row - 1):
            out += (fake, *run)
        return out
