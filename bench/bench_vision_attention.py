"""Mllama's vision attention at full shape, call by call (B=4 images x 4 tiles x 1608 tokens, 16 heads of 80).

Why: the session-4 trace put 62 % of Mllama's log-prob time (~185 ms of 0.317 s) in cuDNN's attention kernel, 80
vision calls per forward (two per layer), and the profile cannot tell which of the two costs what. This times
each call `mllama_vision.vision_attention` makes, and the alternative of one call over the valid keys merged with
one over the padding keys through their log-sum-exps, for images with all 4 tiles real (n = 6404 valid tokens)
and with 1 (n = 1601). Run from the repo root: `PYTHONPATH=. python bench/bench_vision_attention.py`.

`--idefics2`: Idefics2's vision attention (B=4 images x 4900 patches, 16 heads of 72, 37 % of its 7B log-prob time
at 1.36 ms per layer, about 40 % of the matmul rate) with the head dim zero-padded to 80, 96 and 128 (the scale
kept at 72^-0.5, so the result is the same): whether cuDNN runs head dim 72 on a slower path than a padded one.

`--idefics2_split`: Idefics2's vision attention over split images as the tower calls it (`layers.attend` with the
real patches' counts as key lengths), first as the failing eval ran it (traced on this CPU at the same geometry:
one image's 5 crops a call, each 27 x 27 real patches of 70 x 70, the synthetic 64 px pictures resized to 378),
then other batches; then its decoder's causal prefill of 16 prompts (the eval's: 384 tokens), each against XLA's
attention. The eval compiled no other cuDNN-eligible attention (its decode steps run the Pallas decode kernel).
Why: idefics2-8b's FIUBench-sized eval with splitting stopped in its first batch on an H100 with cuDNN attention
(calls 120, 122, 123: a cuDNN graph failing to deserialize, inside a command-buffer capture or, with cuDNN out of
command buffers, a segfault) and ran with XLA's. The one program dumped before that run was cut, the features of
one split image, holds one cuDNN call: the first case here at idefics2-8b's widths, [5, 4900, 16, 72]. Each case
prints before it runs, so a crash names it.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from jax._src.cudnn.fused_attention_stablehlo import MaskType
from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

from bench.bench_jax_llava import timeit
from vlmu_jax.models.layers import SeqLengths, attend
from vlmu_jax.models.mllama_vision import ValidCount, vision_attention


def main() -> None:
    b, s, h, d = 4, 4 * 1608, 16, 80
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (b, s, h, d), jnp.bfloat16) for x in keys)
    scale = d**-0.5
    flop = 4 * b * h * s * s * d
    for n_valid in (6404, 1601):
        n = jnp.full((b,), n_valid, jnp.int32)
        calls = {
            "full_no_mask": jax.jit(lambda q, k, v: attend(q, k, v, None, impl="cudnn")),
            "padding_queries_q_and_kv_lengths": jax.jit(lambda q, k, v, n=n: attend(
                q, k, v, SeqLengths(keys=n, queries=jnp.maximum(s - n, 1)), impl="cudnn")),
            "all_queries_valid_keys_kv_length": jax.jit(lambda q, k, v, n=n: attend(
                q, k, v, SeqLengths(keys=n), impl="cudnn")),
            "all_queries_padding_keys_kv_length": jax.jit(lambda q, k, v, n=n: attend(
                q, k, v, SeqLengths(keys=jnp.maximum(s - n, 1)), impl="cudnn")),
            "valid_keys_with_lse": jax.jit(lambda q, k, v, n=n: cudnn_attention(
                q, k, v, None, None, jnp.full((b,), s, jnp.int32), n, scale=scale,
                mask_type=MaskType.PADDING, return_residual=True)),
            "vision_attention_as_run": jax.jit(lambda q, k, v, n=n: vision_attention(q, k, v, ValidCount(n), "cudnn")),
        }
        for name, fn in calls.items():
            try:
                sec = timeit(lambda fn=fn: fn(q, k, v), n=10, warm=2)
            except Exception as err:  # noqa: BLE001 - a call cuDNN refuses is a result too
                print(json.dumps({"what": "vision_attention", "call": name, "error": str(err)[:300]}), flush=True)
                continue
            print(json.dumps({"what": "vision_attention", "call": name, "n_valid": n_valid, "s": sec,
                              "tflops_if_full": flop / sec / 1e12}), flush=True)

        # What the model runs against XLA's attention with the boolean both-padding mask, one image (float32
        # scores of [16, 6432, 6432] for XLA).
        valid = jnp.arange(s)[None, :] < n[:1, None]
        mask = (valid[:, :, None] | valid[:, None, :])[:, None]
        want = jax.jit(lambda q, k, v, m=mask: vision_attention(q, k, v, m, "xla"))(q[:1], k[:1], v[:1])
        got = jax.jit(lambda q, k, v, n=n: vision_attention(q, k, v, ValidCount(n[:1]), "cudnn"))(q[:1], k[:1], v[:1])
        diff = jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
        print(json.dumps({"what": "vision_attention_vs_xla_mask", "n_valid": n_valid,
                          "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
                          "mean_abs_value": float(jnp.abs(want.astype(jnp.float32)).mean())}), flush=True)


def head_dim_padding() -> None:
    b, s, h, d = 4, 4900, 16, 72
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (b, s, h, d), jnp.bfloat16) for x in keys)
    lengths = jnp.full((b,), s, jnp.int32)  # as the tower calls it: key lengths (real patches first)
    want = None
    for padded in (72, 80, 96, 128):
        def call(q, k, v, padded=padded):
            pad = [(0, 0)] * 3 + [(0, padded - d)]
            q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
            out = jax.nn.dot_product_attention(q, k, v, scale=d**-0.5, key_value_seq_lengths=lengths,
                                               implementation="cudnn")
            return out[..., :d]

        fn = jax.jit(call)
        out = fn(q, k, v)
        want = out if want is None else want
        sec = timeit(lambda fn=fn: fn(q, k, v), n=20, warm=3)
        diff = float(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32)).max())
        print(json.dumps({"what": "vision_attention_head_dim", "head_dim": padded, "s": sec,
                          "tflops_at_72": 4 * b * h * s * s * d / sec / 1e12, "max_abs_diff_vs_72": diff}), flush=True)


def _against_xla(what: str, case: str, q: jax.Array, k: jax.Array, v: jax.Array, **how) -> None:
    """`layers.attend` on cuDNN against XLA's on the same inputs; prints before it runs, so a crash names its case."""
    print(json.dumps({"what": what, "case": case, "q": q.shape, "k": k.shape, "starting": True}), flush=True)
    try:
        got = jax.jit(lambda q, k, v: attend(q, k, v, impl="cudnn", **how))(q, k, v)
        got.block_until_ready()
    except Exception as err:  # noqa: BLE001 - a call cuDNN refuses is the result
        print(json.dumps({"what": what, "case": case, "error": str(err)[:400]}), flush=True)
        return
    want = jax.jit(lambda q, k, v: attend(q, k, v, impl="xla", **how))(q, k, v)
    diff = jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
    print(json.dumps({"what": what, "case": case, "max_abs_diff_vs_xla": float(diff.max()),
                      "mean_abs_value": float(jnp.abs(want.astype(jnp.float32)).mean())}), flush=True)


def idefics2_split() -> None:
    """The two kinds of cuDNN call idefics2-8b's eval makes with image splitting: the vision tower's over each
    image's five crops (real patches first, their counts as key lengths), then the decoder's causal prefill of
    16 prompts (GQA, 32 query and 8 key heads of 128) at the lengths split images give."""
    s, h, d = 4900, 16, 72
    crop = 35 * 35
    for case, lengths in (("the eval's: one synthetic 64 px image split, 27 x 27 patches each", [27 * 27] * 5),
                          ("one 980 px image split", [crop] * 4 + [s]), ("two images split", ([crop] * 4 + [s]) * 2),
                          ("five whole images", [s] * 5), ("four whole images", [s] * 4)):
        q, k, v = (jax.random.normal(x, (len(lengths), s, h, d), jnp.bfloat16)
                   for x in jax.random.split(jax.random.key(len(lengths)), 3))
        _against_xla("idefics2_tower", case, q, k, v, mask=SeqLengths(keys=jnp.asarray(lengths, jnp.int32)))
    for t in (384, 352, 416, 448, 383):  # 384: the eval's (every prompt of the run in one length)
        keys = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(keys[0], (16, t, 32, 128), jnp.bfloat16)
        k, v = (jax.random.normal(x, (16, t, 8, 128), jnp.bfloat16) for x in keys[1:])
        # as the decoder calls it: the causal mask given (XLA's attention reads it; cuDNN's fused causal kernel
        # drops it)
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        _against_xla("idefics2_prefill", f"B=16 T={t}", q, k, v, mask=causal, causal=True)


if __name__ == "__main__":
    {"--idefics2": head_dim_padding, "--idefics2_split": idefics2_split}.get(
        (sys.argv[1:] or [""])[0], main)()
