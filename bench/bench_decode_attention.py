"""A decode step's attention, the Pallas kernel (vlmu_jax/models/decode_attention.py) against XLA's masked attention
(what `layers.attend` ran before it), at the decoders' real shapes.

Each timed program runs 8 decode steps' attention in a loop, each over 32 layers (32 separate caches, as a
32-layer model reads them; a layer's query is the previous layer's output added to its own), over left-padded
rows with room for new tokens at the end: one query per row, keys and values [B, S, K, H] bfloat16. One JSON line
per shape and path: microseconds per layer, the bandwidth that implies for the keys and values read (each valid
slot's key and value once), and the largest difference from a float32 reference.
Run from the repo root on a GPU: `PYTHONPATH=. python bench/bench_decode_attention.py`.
"""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bench.bench_jax_llava import timeit
from vlmu_jax.models.decode_attention import decode_attention

LAYERS = 32
STEPS = 8
# the kernel's (block_k, warps, stages) tilings to time; None: decode_attention's default for that shape
TILINGS = (None, (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (32, 4, 3))
# (name, B, S = cache slots, query heads, key heads, head size): LLaVA-1.5-7B's 704-token rows with room for 32
# new tokens, at B=4, 16 and 64; Llama-3.2-11B-Vision's decoder (grouped heads, 8 key heads) at a 1 k cache.
SHAPES = (("llava7b", 4, 736, 32, 32, 128), ("llava7b", 16, 736, 32, 32, 128), ("llava7b", 64, 736, 32, 32, 128),
          ("mllama11b", 4, 1024, 32, 8, 128), ("mllama11b", 16, 1024, 32, 8, 128))


def xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def main() -> None:
    for name, b, s, n, kh, hd in SHAPES:
        rng = np.random.RandomState(0)
        pads = rng.randint(0, 64, b)
        filled = s - 32 + 1  # the prompt and the first new token; 31 slots of room left
        valid = (np.arange(s)[None] >= pads[:, None]) & (np.arange(s)[None] < filled)
        mask = jnp.asarray(valid)[:, None, None, :]
        key = jax.random.key(0)
        q = jax.random.normal(key, (LAYERS, b, 1, n, hd), jnp.bfloat16)
        ks = [jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (b, s, kh, hd), jnp.bfloat16)
              for i in range(LAYERS)]
        vs = [jax.random.normal(jax.random.fold_in(key, 2 * i + 2), (b, s, kh, hd), jnp.bfloat16)
              for i in range(LAYERS)]
        ref = xla(q[0].astype(jnp.float32), ks[0].astype(jnp.float32), vs[0].astype(jnp.float32), mask)
        read = 2 * int(valid.sum()) * kh * hd * 2  # bytes of valid keys and values per layer
        paths = [("pallas_default", decode_attention) if tiling is None else
                 ("pallas_k{}_w{}_s{}".format(*tiling),
                  partial(decode_attention, **dict(zip(("block_k", "warps", "stages"), tiling, strict=True))))
                 for tiling in TILINGS]
        for path, attention in [*paths, ("xla", xla)]:
            @jax.jit
            def step(q, ks, vs, mask, attention=attention):
                """STEPS decode steps of LAYERS layers in a loop (as generation's loop runs them, one command
                buffer per step), each layer's query fed by the previous layer's output."""
                def body(_, x):
                    for i in range(LAYERS):
                        x = attention(q[i] + x, ks[i], vs[i], mask)
                    return x

                return jax.lax.fori_loop(0, STEPS, body, jnp.zeros_like(q[0]))

            out = attention(q[0], ks[0], vs[0], mask)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
            args = (q, ks, vs, mask)
            sec = timeit(lambda step=step, args=args: step(*args), n=20) / (STEPS * LAYERS)
            print(json.dumps({"what": "decode_attention", "shape": name, "path": path, "B": b, "S": s, "N": n,
                              "K": kh, "H": hd, "us_per_layer": sec * 1e6, "valid_kv_gb_per_s": read / sec / 1e9,
                              "max_abs_err_vs_f32": err}), flush=True)


if __name__ == "__main__":
    main()
