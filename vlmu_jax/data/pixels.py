"""The pixel arithmetic every HF image processor shares, with transformers' dtypes.

transformers rescales in float64 and casts to float32 before normalising in float32; doing the same steps in
the same dtypes is what keeps our processors within float32 rounding of theirs.
"""

from __future__ import annotations

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (LLaVA-1.5, Llama-3.2-Vision)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # Idefics2's mean and std


def rescale_normalize(pixels: np.ndarray, rescale_factor: float | None, mean: tuple[float, ...] | None,
                      std: tuple[float, ...] | None) -> np.ndarray:
    """[3, H, W] pixels -> float32; ``rescale_factor`` None skips the rescale, ``mean`` None the normalisation."""
    x = pixels.astype(np.float32) if rescale_factor is None else (
        pixels.astype(np.float64) * rescale_factor).astype(np.float32)
    if mean is None:
        return x
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
