"""Each image's features computed once per model and put in every batch that shows the image, in place of its
pixels: in evaluation, and in the training stages whose image path (vision tower and projector) does not train.

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
gives the same values, up to the float rounding of a different batch size. In training the same holds while the
tower and the projector are frozen: MLLMU-Bench's stages train adapters on the language model only, and each
image is shown once per question per epoch. FIUBench's unlearning also trains the projector (the seeds'
`tune_mm_projector`): its batches carry the tower's states instead (VISION_STATES, `vision_states`), and each step
runs the projector on them. Those are larger (LLaVA-1.5: 1.2 MB an image; idefics2-8b: 11 MB a crop;
Llama-3.2-11B-Vision: 98 MB for four tiles, its final and intermediate layers' states), and the tower's share is
what they save: most of the step for Mllama and split Idefics2, ~1 % for LLaVA-1.5-7B.

What is kept per image is what the decoder reads: the projected features spliced in as token embeddings (LLaVA,
Idefics2, Qwen2-VL; 4.7 MB at LLaVA-1.5-7B, 2.6 MB for idefics2-8b's split image) or Mllama's projected vision
states, from which each cross-attention layer makes its K/V (52 MB for four tiles at 11B). The features are
computed in one process only: with several, each host makes its own rows' images, and a program on the shared
mesh would need every process to run it at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlmu_jax.data.image_cache import ImageCache
from vlmu_jax.eval.frozen import CUBLAS_GEMMS, abstract_calls, is_frozen, model_jit
from vlmu_jax.models.architecture import IMAGE_EMBEDDINGS, VISION_STATES
from vlmu_jax.models.sharding import abstract_batch, batch_shards, global_batch

# Where a batch's images may start inside the model, latest first, and the top-level modules whose params read them
# (none of which may train while batches carry them): the decoder's image inputs, or the tower's states.
READ_BY = {IMAGE_EMBEDDINGS: ("vision_tower", "multi_modal_projector"), VISION_STATES: ("vision_tower",)}
# The model's method that makes each, its attribute naming the image inputs still read beside it, and its name in
# the stages' logs.
_MADE_BY = {IMAGE_EMBEDDINGS: ("image_embeddings", "KEPT_WITH_EMBEDDINGS", "features"),
            VISION_STATES: ("vision_states", "KEPT_WITH_STATES", "vision-tower states")}


def cut_name(key: str) -> str:
    """What a `READ_BY` key's values are called in the logs."""
    return _MADE_BY[key][2]


@functools.partial(model_jit, static_argnames=("key",), compiler_options=CUBLAS_GEMMS)
def _image_inputs(model: nnx.Module, images: dict[str, jax.Array], *, key: str) -> jax.Array:
    return getattr(model, _MADE_BY[key][0])(images)


def _made(model: nnx.Module, inputs: list[dict[str, np.ndarray]], n: int, mesh: Mesh | None,
          key: str = IMAGE_EMBEDDINGS) -> list[dict[str, np.ndarray]]:
    """Each image's inputs once `key` is made of them (it, and what the model reads beside it), the images run as
    one program of `n` rows (a multiple of the mesh's batch shards; the last image fills the rest). Inside
    `compile_only` (compile-ahead's sample batches) the program compiles beside the others and zeros of its
    outputs' shapes stand for the values: nothing runs on the devices."""
    padded = inputs + [inputs[-1]] * (n - len(inputs))
    batch = {k: np.stack([x[k] for x in padded]) for k in inputs[0]}
    if abstract_calls():
        shape = _image_inputs(model, abstract_batch(batch, mesh), key=key)
        made = np.broadcast_to(np.zeros((), shape.dtype), shape.shape)  # its shape and bytes, no memory of its own
    else:
        made = np.asarray(_image_inputs(model, global_batch(batch, mesh), key=key))
    kept = getattr(model, _MADE_BY[key][1])
    return [{key: f, **{k: x[k] for k in kept}} for f, x in zip(made, inputs, strict=False)]


def embedded_image_fn(model: nnx.Module, image_fn: Callable[[Any], dict[str, np.ndarray]], max_bytes: int,
                      mesh: Mesh | None) -> Callable[[Any], dict[str, np.ndarray]] | None:
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
    shards = batch_shards(mesh)  # one image per batch shard: the program's batch must split over the mesh

    def make(ref: Any) -> dict[str, np.ndarray]:
        return _made(model, [image_fn(ref)], shards, mesh)[0]

    cache = ImageCache(make, max_bytes)
    # the stand-ins of compile-ahead and of size queries (`_made` inside compile_only / shapes_only) are not the
    # image's features: never kept
    return lambda ref: make(ref) if abstract_calls() else cache(ref)


def training_cut(model: nnx.Module, trainable: nnx.filterlib.Filter) -> str | None:
    """The latest start a training stage's batches can give their images (a `READ_BY` key) while `trainable` (LoRA
    adapters included) leaves everything that reads it frozen: IMAGE_EMBEDDINGS where nothing on the image path
    trains, VISION_STATES where the projector does; None (pixels) where the vision tower does."""
    trains = {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(model, trainable))}
    return next((key for key, modules in READ_BY.items() if not trains & set(modules)), None)


def same_image_path(a: nnx.Module, b: nnx.Module, key: str) -> bool:
    """Whether two models hold the same values in the params that make `key` (a reference model reads the policy's
    batches)."""
    def leaves(model: nnx.Module) -> list[jax.Array]:
        return jax.tree.leaves([nnx.state(getattr(model, name), nnx.Param) for name in READ_BY[key]])

    ours, theirs = leaves(a), leaves(b)
    return len(ours) == len(theirs) and all(
        x.shape == y.shape and bool(jnp.array_equal(x, y)) for x, y in zip(ours, theirs, strict=True))


def stage_image_fn(model: nnx.Module, image_fn: Callable[[Any], dict[str, np.ndarray]], refs: Iterable[Any],
                   max_bytes: int, mesh: Mesh | None, batch_size: int,
                   key: str) -> tuple[Callable[[Any], dict[str, np.ndarray]] | None, int]:
    """(An `image_fn` for a training stage's batches, the bytes it holds): `key` (a `READ_BY` key) of every image in
    `refs` and of the text-only blank, made now in `batch_size` images a program, looked up by the batches. Made
    before the first step because the model trains while its batches are made in other threads. The caller checks
    that nothing reading `key` trains (`training_cut`) and that one process runs (each host makes its own rows'
    batches). (None, the bytes they would take) when those exceed `max_bytes` (config
    <stage>.image_embeddings_mb): every image's values are the blank's size, so the first program tells."""
    refs = list(dict.fromkeys([None, *refs]))
    shards = batch_shards(mesh)
    n = -(-max(batch_size, 1) // shards) * shards
    kept: dict[Any, dict[str, np.ndarray]] = {}
    for start in range(0, len(refs), n):
        chunk = refs[start:start + n]
        kept.update(zip(chunk, _made(model, [image_fn(ref) for ref in chunk], n, mesh, key), strict=True))
        if start == 0:
            total = sum(a.nbytes for a in kept[None].values()) * len(refs)
            if total > max_bytes:
                return None, total
    return kept.__getitem__, total
