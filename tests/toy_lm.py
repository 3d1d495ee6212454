"""A tiny causal LM with the trainer-facing shape of the real model, plus fixed-sequence BatchSources.

It stands in for LLaVA in the trainer tests: `model(input_ids, attention_mask, images)` (images
ignored), optional `nnx.LoRAParam` adapters on one projection (zero-initialised B, like LoRA), and
dropout so that RNG state matters for resume.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB, DIM, T = 16, 32, 8


class ToyLM(nnx.Module):
    def __init__(self, *, lora_rank: int = 0, dropout: float = 0.0, seed: int = 0):
        rngs = nnx.Rngs(seed, dropout=seed + 1)
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.pos = nnx.Param(0.1 * jax.random.normal(jax.random.key(seed + 2), (T, DIM)))
        self.mix = nnx.Linear(2 * DIM, DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, VOCAB, use_bias=False, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.lora_a = nnx.LoRAParam(0.1 * jax.random.normal(jax.random.key(seed + 3), (2 * DIM, lora_rank)))
        self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank, DIM)))

    def hidden(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """The one "layer"'s output [B, T, D]: each position sees itself and the causal mean of the prefix."""
        h = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        m = attention_mask[..., None].astype(h.dtype)
        prefix = jnp.cumsum(h * m, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
        x = jnp.concatenate([h, prefix], axis=-1)
        return jnp.tanh(self.mix(x) + x @ self.lora_a @ self.lora_b)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, images: dict) -> jax.Array:
        """Logits [B, T, V]."""
        return self.head(self.drop(self.hidden(input_ids, attention_mask)))


def logps_fn(model: ToyLM, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Target-token log-probs [B, T-1] and the answer mask (labels != -100), per CONTRACT.md."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["images"])[:, :-1]
    targets = batch["input_ids"][:, 1:]
    logps = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return logps, batch["labels"][:, 1:] != -100


def kl_fn(model: ToyLM, ref: ToyLM, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Full-vocab KL(ref || model) per position over the real tokens (small V, so no chunking here)."""
    args = (batch["input_ids"], batch["attention_mask"], batch["images"])
    lp, lq = jax.nn.log_softmax(model(*args)[:, :-1]), jax.nn.log_softmax(ref(*args)[:, :-1])
    return jnp.sum(jnp.exp(lq) * (lq - lp), axis=-1), batch["attention_mask"][:, :-1] == 1


def vocab_fn(model: ToyLM, ref: ToyLM | None, batch: dict, stat) -> jax.Array:
    """An objective's full-vocab statistic per position, from direct softmaxes (small V)."""
    args = (batch["input_ids"], batch["attention_mask"], batch["images"])
    logq = None if ref is None else jax.nn.log_softmax(ref(*args)[:, :-1])
    return stat(jax.nn.log_softmax(model(*args)[:, :-1]), logq, batch["input_ids"][:, 1:])


def hidden_fn(model: ToyLM, batch: dict, layer: int) -> tuple[jax.Array, jax.Array]:
    """The toy's only hidden layer (any `layer`) and the unshifted answer mask."""
    return model.hidden(batch["input_ids"], batch["attention_mask"]), batch["labels"] != -100


def make_batch(rows: np.ndarray, prompt_len: int = 2) -> dict[str, np.ndarray]:
    """Right-padded batch of full-length rows; the first `prompt_len` tokens are prompt (label -100)."""
    labels = rows.copy()
    labels[:, :prompt_len] = -100
    return {
        "input_ids": rows.astype(np.int32),
        "attention_mask": np.ones_like(rows, np.int32),
        "labels": labels.astype(np.int32),
        "images": {"pixel_values": np.zeros((rows.shape[0], 3, 2, 2), np.float32)},
    }


class FixedSource:
    """BatchSource over fixed rows: epoch order reshuffled from the seed, deterministic for any index."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int = 0):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size

    def get(self, index: int) -> dict[str, np.ndarray]:
        epoch, pos = divmod(index, len(self))
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))
        per_host = self.batch_size // jax.process_count()
        start = pos * self.batch_size + jax.process_index() * per_host
        return make_batch(self.rows[order[start : start + per_host]])


def sequences(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, T))
