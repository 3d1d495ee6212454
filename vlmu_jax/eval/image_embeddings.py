"""Each image's features computed once per evaluated model and put in every batch that shows the image, in place of
its pixels.

Why: evaluation shows one image in many rows. Each FIUBench identity's picture is shown by all of its questions.
Each question's prompt is run by the scoring pass, the generation pass and the APE variants, and every few-shot
image of MLLMU-Bench's eval.py is shown by every few-shot row. Until now each row ran the vision tower on its own
copy of the image. Per prompt, the tower's share of the prefill's FLOPs at the real shapes is:
- Llama-3.2-11B-Vision: ~4/5 (its ViT-H over four 560 px tiles of 1601 positions, ~8 TFLOP, against ~2 TFLOP of
  decoder for a question of ~100 tokens);
- idefics2-8b with image splitting: more than half (SigLIP-so400m over five crops of up to 4900 patches, 8-20
  TFLOP as the crops fill their 980 px, against ~5 TFLOP of decoder for 320 image tokens and the question);
- Qwen2.5-VL-7B at the presets' cap: ~1/4;
- LLaVA-1.5-7B: ~4 %.
Evaluation never trains the model, so an image's features are a function of the image alone. Computing them once
gives the same values, up to the float rounding of a different batch size.

What is kept per image is what the decoder reads: the projected features spliced in as token embeddings (LLaVA,
Idefics2, Qwen2-VL; 4.7 MB at LLaVA-1.5-7B, 2.6 MB for idefics2-8b's split image) or Mllama's projected vision
states, from which each cross-attention layer makes its K/V (52 MB for four tiles at 11B). The features are
computed in one process only: with several, each host makes its own rows' images, and a program on the shared
mesh would need every process to run it at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlmu_jax.data.image_cache import ImageCache
from vlmu_jax.eval.frozen import is_frozen, model_jit
from vlmu_jax.models.architecture import IMAGE_EMBEDDINGS
from vlmu_jax.models.sharding import batch_shards, global_batch


@model_jit
def _image_embeddings(model: nnx.Module, images: dict[str, jax.Array]) -> jax.Array:
    return model.image_embeddings(images)


def embedded_image_fn(model: nnx.Module, image_fn: Callable[[Any], dict[str, np.ndarray]], max_bytes: int,
                      mesh: Mesh | None) -> ImageCache | None:
    """An `image_fn` for `model`'s evaluation batches. Each image reference (None: a text-only row's blank) maps
    to `{IMAGE_EMBEDDINGS: [tokens, D]}`, plus the inputs the model still reads beside them
    (`KEPT_WITH_EMBEDDINGS`). The values are made once from `image_fn`'s inputs and kept within `max_bytes` of
    host memory (config eval.image_embeddings_mb). None where this does not apply: `max_bytes` 0 or several
    processes. The model must be frozen (eval/frozen.py) while the result is used: batches are made in the
    prefetch threads while the model runs in the main one."""
    if max_bytes <= 0 or jax.process_count() > 1:
        return None
    if not is_frozen(model):
        raise ValueError("image embeddings are made in batch threads: evaluate the model inside eval.frozen.frozen")
    copies = batch_shards(mesh)  # one image per batch shard: the program's batch must split over the mesh

    def make(ref: Any) -> dict[str, np.ndarray]:
        inputs = image_fn(ref)
        batch = global_batch({k: np.stack([v] * copies) for k, v in inputs.items()}, mesh)
        features = np.asarray(_image_embeddings(model, batch)[0])
        return {IMAGE_EMBEDDINGS: features, **{k: inputs[k] for k in model.KEPT_WITH_EMBEDDINGS}}

    return ImageCache(make, max_bytes)
