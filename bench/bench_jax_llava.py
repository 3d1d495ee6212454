"""vlmu_jax counterpart of shared/anchors/bench_hf_llava.py: LLaVA-1.5-7B shape, random bf16 weights.

Same workload as the anchor (B=4 rows of BOS + 576 image tokens + 127 text tokens = 704 tokens):
teacher-forced log-probs, greedy generation of 32 tokens (also at the GEN_B batch sizes; GEN_SCAN=1,0 adds
the unrolled decoder), and the pipeline's own LoRA (r=128, all LM linears) AdamW train step for GA (with and without
rematerialisation), GD and NPO (twin: bench/bench_hf_unlearn.py). One JSON line per measurement with the
anchor's keys plus peak device memory. `--small` is a tiny shape that runs on CPU.
Run from the repo root: `PYTHONPATH=. python bench/bench_jax_llava.py [--small]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.bench_dropout import hashed, materialised, philox, xla_keep
from vlmu_jax import device_memory
from vlmu_jax.config_schema import base_config
from vlmu_jax.data.batching import IGNORE, label_index, label_slots
from vlmu_jax.eval.frozen import compile_only, frozen
from vlmu_jax.eval.generate import generate
from vlmu_jax.eval.layer_copies import layer_copies
from vlmu_jax.eval.scoring import continuation_logprobs, token_logprobs
from vlmu_jax.models import layers, lora_kernel
from vlmu_jax.models.layers import dropout_keep, resolve_attention_impl
from vlmu_jax.models.lora import apply_lora, merge_lora
from vlmu_jax.models.lora_kernel import fused_call
from vlmu_jax.models.registry import init_model, set_options
from vlmu_jax.presets import lora_remat
from vlmu_jax.stages import logps_fn
from vlmu_jax.unlearn import layerwise, reference_pass
from vlmu_jax.unlearn.objectives import get_objective
from vlmu_jax.unlearn.optim import make_optimizer
from vlmu_jax.unlearn.trainer import TrainConfig, make_loss, prepare_step, reference_forward

# Extra batch sizes for greedy generation (the issue asks for B=16 and B=64 besides the anchor's B=4).
# GEN_SCAN=1,0 also times the unrolled decoder (slower on the H200, bench/NOTES.md).
GEN_BATCHES = tuple(int(x) for x in os.environ.get("GEN_B", "16,64").split(",") if x)
GEN_SCAN = tuple(x == "1" for x in os.environ.get("GEN_SCAN", "1").split(","))
# The unlearning steps to time, objective:remat pairs (by default the LLaVA-1.5 presets' LoRA policy);
# objective:remat:xla|materialised|philox|hashed draws the dropout masks as bench/bench_dropout.py's function of that
# name (default: layers.dropout_keep, on one GPU its kernel; `ones`: every element kept, a constant XLA folds the
# masks' selects into, so the difference to the default is what the masks cost the step); objective:remat:MASKS:apart
# (:joined) holds the frozen q/k/v and gate/up kernels apart (joined) in the per-layer step
# (layerwise.JOIN_FROZEN_KERNELS; default: its default); objective:remat:MASKS:KERNELS:fused (:unfused) runs LoRA's
# dropout and down-product as models/lora_kernel.py's one kernel on one GPU (as XLA's mask kernel, select and gemm;
# default: layers.FUSED_LORA_DROPOUT's), objective:remat:MASKS:KERNELS:rows/blocks/warps/stages/programs the kernel
# with that tiling. objective@once (npo@once, dpo@once): the reference's log-probs made before the steps
# (unlearn/reference_pass.py, `reference_logps`), its one batch's forward timed as reference_pass_s.
_LORA = lora_remat("llava-1.5")  # what the LLaVA-1.5 presets' LoRA stages run
STEPS = tuple(tuple(x.split(":")) for x in os.environ.get(
    "STEPS", f"ga:{_LORA},ga:none,gd:{_LORA},npo:{_LORA},npo@once:{_LORA}").split(",") if x)
# Which workloads run (WORK=logprob,steps for the flag and layout experiments); SCAN=0 runs log-probs and the
# steps with the layers unrolled instead of scanned.
WORK = set(os.environ.get("WORK", "logprob,steps,generate").split(","))
# Log-probs and generation with and without the per-layer weight copies the eval stage attaches (layer_copies).
COPIES = tuple(x == "1" for x in os.environ.get("COPIES", "1,0").split(","))
# FROZEN=1,0: eval calls on the model split once (eval/frozen.py, what the eval stage runs) and through nnx.jit.
FROZEN = tuple(x == "1" for x in os.environ.get("FROZEN", "1").split(","))
# HEAD_CHUNKS=auto,128,704: log-probs with the output head over chunks of that many positions (token_logprobs'
# chunk_size); auto is the eval's (scoring.eval_head_chunk: every position at once here, no scan around the head)
HEAD_CHUNKS = tuple(None if x == "auto" else int(x) for x in os.environ.get("HEAD_CHUNKS", "auto").split(","))
# WORK=shared: answers per prompt of the shared-prompt scoring call (FIUBench's forget split has 7 per question).
SHARED_K = tuple(int(x) for x in os.environ.get("SHARED_K", "7,1").split(",") if x)
# STEP_COPIES=1,0: the steps over per-layer weight copies (unrolled, eval/layer_copies.py) and over the stack.
STEP_COPIES = tuple(x == "1" for x in os.environ.get("STEP_COPIES", "0").split(","))
# LAYERWISE=always,never: the steps layer by layer (unlearn/layerwise.py, the pipeline's default on GPU) and as one
# scanned program.
LAYERWISE = tuple(x for x in os.environ.get("LAYERWISE", "always,never").split(",") if x)
# The steps' output head: at the batch's label positions (labels: what the pipeline's training sources give) or at
# every position (all: before session 24)
POSITIONS = tuple(x for x in os.environ.get("POSITIONS", "labels").split(",") if x)
GEN_COPIES = tuple(x == "1" for x in os.environ.get("GEN_COPIES", os.environ.get("COPIES", "1,0")).split(","))
SCAN = os.environ.get("SCAN", "1") == "1"
# DECODE_KERNEL=0: decode steps' attention on XLA's masked path instead of models/decode_attention.py's kernel;
# DECODE_TILING=block_k,warps,stages: the kernel with that tiling instead of its default.
if os.environ.get("DECODE_KERNEL", "1") == "0":
    layers.decode_attention.supported = lambda *args: False
# MASK_TILING=rows,blocks,warps: the dropout-mask kernel (models/dropout_kernel.py) with that tiling (the same bits)
if os.environ.get("MASK_TILING"):
    _mask_tiling = dict(zip(("block_rows", "block_cols", "warps"), map(int, os.environ["MASK_TILING"].split(",")),
                            strict=True))
    layers.dropout_kernel.keep_mask = partial(layers.dropout_kernel.keep_mask, **_mask_tiling)
if os.environ.get("DECODE_TILING"):
    _tiling = dict(zip(("block_k", "warps", "stages"), map(int, os.environ["DECODE_TILING"].split(",")), strict=True))
    layers.decode_attention.decode_attention = partial(layers.decode_attention.decode_attention, **_tiling)


def hf_config(small: bool) -> dict:
    if small:
        vision = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
        )
        text = dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=32064,
        )
    else:
        vision = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        )
        text = dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
        )
    vision.update(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text.update(
        model_type="llama",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision,
        "text_config": text,
        "image_token_index": 32000,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
    }


FIRST_CALLS: list[float] = []  # seconds of each timed workload's first call (its trace and compile), in order


def timeit(fn: Callable[[], jax.Array], n: int = 5, warm: int = 2) -> float:
    """Median seconds of `n` calls after `warm` calls; the first call's seconds go to FIRST_CALLS."""
    for i in range(warm):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        if i == 0:
            FIRST_CALLS.append(time.perf_counter() - t0)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def compiled_ahead(call: Callable[[], object]) -> tuple[float, float]:
    """Compiles a frozen model's eval call ahead, as the eval stage does (`eval.compile_ahead`): the seconds, and
    the call's own device peak in GiB from its compiled programs' memory analysis (every array it reads, the
    model's weights or their layer copies included, + outputs - aliases + temporaries). Why: the process peak
    also counts the eager random init (jax.random draws 32-bit bits for a whole stacked bf16 param at once),
    which no eval run does, so it cannot be set beside PyTorch's peak for the same call."""
    t0 = time.perf_counter()
    with compile_only() as programs:
        call()

    def own(program: jax.stages.Compiled) -> int:
        m = program.memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

    # A call of several programs (a prompt pass, then the program over its cache, which takes the cache as an
    # argument) peaks in the largest of them.
    return time.perf_counter() - t0, max(map(own, programs)) / 2**30


def peak_gb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--remat", default="none")
    args = parser.parse_args()
    device_memory.configure(base_config().device_memory_fraction)  # the pipeline's GPU pool
    b, t_text, n_img = int(os.environ.get("B", 4)), int(os.environ.get("T", 128)), 576
    t0 = time.perf_counter()
    model = init_model(hf_config(args.small), seed=0, dtype=jnp.bfloat16, remat=args.remat)
    set_options(model, scan_layers=SCAN)
    jax.block_until_ready(jax.tree.leaves(model))
    nparams = sum(x.size for x in jax.tree.leaves(model))
    print(
        json.dumps(
            {
                "what": "init",
                "params": int(nparams),
                "s": time.perf_counter() - t0,
                "attn": resolve_attention_impl(model.config.attention_impl),
                "device": str(jax.devices()[0]),
                "scan_layers": SCAN,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "decode_kernel": os.environ.get("DECODE_KERNEL", "1"),
                "decode_tiling": os.environ.get("DECODE_TILING", "default"),
            }
        ),
        flush=True,
    )
    rng = np.random.RandomState(0)
    # The anchor's rows are n_img + t_text tokens long (BOS, images, then t_text - 1 text tokens).
    ids = rng.randint(100, 32000, (b, n_img + t_text)).astype(np.int32)
    ids[:, 1 : 1 + n_img], ids[:, 0] = 32000, 1
    ids, mask = jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))
    pix = {"pixel_values": jnp.asarray(rng.randn(b, 3, 336, 336), jnp.bfloat16)}

    for copies, freeze, chunk in itertools.product(COPIES, FROZEN, HEAD_CHUNKS) if "logprob" in WORK else ():
        mode = "always" if copies else "never"
        with layer_copies(model, mode) as attached, frozen(model) if freeze else nullcontext():
            logprob_time(model, ids, mask, pix, {"layer_copies": attached, "frozen": freeze, "head_chunk": chunk})
    if "shared" in WORK:
        shared_time(model, rng)
    apply_lora(model, rank=128, alpha=256.0, dropout=0.05, seed=0)
    # Loss on the second half of the text, as the anchor's labels.
    labels = jnp.where(jnp.arange(ids.shape[1]) >= 1 + n_img + t_text // 2, ids, IGNORE)
    batches = {"all": {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": pix}}
    labels_np = np.asarray(labels)
    batches["labels"] = {**batches["all"], "label_index": jnp.asarray(label_index(labels_np, label_slots(labels_np)))}
    join_default, fused_default = layerwise.JOIN_FROZEN_KERNELS, layers.FUSED_LORA_DROPOUT
    for (objective, remat, *how), copies, form, positions in itertools.product(
            STEPS if "steps" in WORK else (), STEP_COPIES, LAYERWISE, POSITIONS):
        dropout, kernels, lora = (how + ["", "", ""])[:3]
        masks = {"xla": xla_keep, "materialised": materialised, "philox": philox, "hashed": hashed,
                 "ones": lambda rng, shape, rate: jnp.ones(shape, bool)}
        layers.dropout_keep = masks.get(dropout, dropout_keep)
        layerwise.JOIN_FROZEN_KERNELS = {"joined": True, "apart": False}.get(kernels, join_default)
        layers.FUSED_LORA_DROPOUT = {"fused": True, "unfused": False}.get(lora, fused_default or "/" in lora)
        tiling = dict(zip(("block_rows", "block_cols", "warps", "stages", "programs"), map(int, lora.split("/")),
                          strict=True)) if "/" in lora else {}
        lora_kernel.fused_call = partial(fused_call, **tiling)
        with layer_copies(model, "always" if copies else "never") as attached:
            r = unlearn_step_time(model, objective, remat, batches[positions],
                                  layerwise_mode="never" if copies else form)
        print(json.dumps({"what": f"lora_{objective}_step", "remat": remat, "dropout": dropout or "dropout_keep",
                          "frozen_kernels": "joined" if layerwise.JOIN_FROZEN_KERNELS else "apart",
                          "lora_dropout": lora if "/" in lora else "fused" if layers.FUSED_LORA_DROPOUT else "unfused",
                          "layer_copies": attached, "layerwise": form,
                          "positions": positions, "B": b,
                          "T": n_img + t_text, "s": r.s,
                          "compile_s": r.compile_s, "samples_per_s": b / r.s, "max_mem_gb": r.process_peak_gb,
                          "step_peak_gb": r.step_peak_gb, "reference_pass_s": r.reference_pass_s}), flush=True)
    layers.dropout_keep, layerwise.JOIN_FROZEN_KERNELS = dropout_keep, join_default
    layers.FUSED_LORA_DROPOUT, lora_kernel.fused_call = fused_default, fused_call
    if "generate" not in WORK:
        return
    set_options(model, scan_layers=True)
    merge_lora(model)  # generation runs the plain model, as the anchor's does
    # eos_token_id=() never stops early, like the anchor's min_new_tokens=32. Decoding with scanned layers and
    # unrolled ones: a scan slices each layer's weights out of the stacked array at every token.
    for gb in sorted({b, *GEN_BATCHES}):
        rows = jax.tree.map(lambda x, n=gb: jnp.concatenate([x] * -(-n // b))[:n], {"input_ids": ids, "pix": pix})
        for scan, copies in itertools.product(GEN_SCAN, GEN_COPIES):
            set_options(model, scan_layers=scan)
            with layer_copies(model, "always" if copies else "never") as attached, frozen(model):
                def call(r: dict = rows) -> jax.Array:
                    return generate(model, r["input_ids"], jnp.ones_like(r["input_ids"]), r["pix"],
                                    max_new_tokens=32, eos_token_id=())

                ahead_s, own_gb = compiled_ahead(call)
                s = timeit(call, n=3, warm=1)
            print(json.dumps({"what": "generate32", "B": gb, "scan_layers": scan, "layer_copies": attached, "s": s,
                              "compile_ahead_s": ahead_s, "first_call_s": FIRST_CALLS[-1],
                              "new_tokens_per_s": gb * 32 / s, "own_peak_gb": own_gb, "max_mem_gb": peak_gb()}),
                  flush=True)


def logprob_time(model: nnx.Module, ids: jax.Array, mask: jax.Array, pix: dict, how: dict) -> None:
    """Median time of the eval's teacher-forced log-probs (one JSON line)."""
    b, t = ids.shape
    chunk = how["head_chunk"]
    ahead = compiled_ahead(lambda: token_logprobs(model, ids, mask, pix, chunk_size=chunk)) if how["frozen"] else (
        None, None)
    s = timeit(lambda: token_logprobs(model, ids, mask, pix, chunk_size=chunk))
    print(
        json.dumps(
            {
                "what": "eval_logprob",
                **how,
                "B": b,
                "T": t,
                "s": s,
                "compile_ahead_s": ahead[0],
                "first_call_s": FIRST_CALLS[-1],
                "own_peak_gb": ahead[1],
                "samples_per_s": b / s,
                "max_mem_gb": peak_gb(),
            }
        ),
        flush=True,
    )


def shared_time(model: nnx.Module, rng: np.random.RandomState) -> None:
    """The eval stage's shared-prompt scoring call (`eval.shared_prompts`) at FIUBench's LLaVA-1.5 shape: B=16
    left-padded prompts of up to BOS + 576 image tokens + 63 text tokens (640; row r has (r % 4) * 8 padding
    tokens), each with K answers of C=16 tokens, over the layer copies of a frozen model, as the eval stage runs it;
    with K=1 beside it (what the prompt's pass costs) and the first answers' rows scored whole, right-padded
    (B=16 x 656, one such call per answer). One JSON line each: seconds, compile-ahead seconds, the call's own
    device peak; the whole rows' line also gives the largest |log p| difference of an answer token between the two
    ways (the shared prompts' prefill runs the fused causal kernel over its tokens moved to the front)."""
    b, p, c = 16, 640, 16
    ids = rng.randint(100, 32000, (b, p)).astype(np.int32)
    ids[:, 1:577], ids[:, 0] = 32000, 1
    pads = (np.arange(b) % 4) * 8
    prompts, mask = np.zeros_like(ids), np.zeros_like(ids)
    for r, n in enumerate(pads):
        prompts[r, n:], mask[r, n:] = ids[r, : p - n], 1
    pix = {"pixel_values": jnp.asarray(rng.randn(b, 3, 336, 336), jnp.bfloat16)}
    first = None
    with layer_copies(model, "always") as attached, frozen(model):
        for k in SHARED_K:
            cont = jnp.asarray(rng.randint(100, 32000, (b, k, c)), jnp.int32)
            cmask = jnp.ones((b, k, c), jnp.int32)

            def call(cont: jax.Array = cont, cmask: jax.Array = cmask) -> tuple:
                return continuation_logprobs(model, jnp.asarray(prompts), jnp.asarray(mask), pix, cont, cmask,
                                             sliced=attached)

            ahead_s, own_gb = compiled_ahead(call)
            s = timeit(call)
            first = first or (np.asarray(cont[:, 0]), np.asarray(call()[0][:, 0], np.float32))
            print(json.dumps({"what": "shared_prompt_logprob", "B": b, "P": p, "K": k, "C": c, "s": s,
                              "compile_ahead_s": ahead_s, "own_peak_gb": own_gb, "scored_per_s": b * (p + k * c) / s,
                              "max_mem_gb": peak_gb()}), flush=True)
        whole, wmask = np.zeros((b, p + c), np.int32), np.zeros((b, p + c), np.int32)
        for r, n in enumerate(pads):
            whole[r, : p + c - n] = np.concatenate([ids[r, : p - n], first[0][r]])
            wmask[r, : p + c - n] = 1
        whole, wmask = jnp.asarray(whole), jnp.asarray(wmask)
        ahead_s, own_gb = compiled_ahead(lambda: token_logprobs(model, whole, wmask, pix, with_stats=True))
        s = timeit(lambda: token_logprobs(model, whole, wmask, pix, with_stats=True))
        logps = np.asarray(token_logprobs(model, whole, wmask, pix, with_stats=True)[0], np.float32)
        answer = np.stack([logps[r, p - n - 1 : p - n - 1 + c] for r, n in enumerate(pads)])
        print(json.dumps({"what": "whole_row_logprob", "B": b, "T": p + c, "s": s, "compile_ahead_s": ahead_s,
                          "own_peak_gb": own_gb, "scored_per_s": b * (p + c) / s,
                          "max_abs_dlogp_vs_shared": float(np.max(np.abs(answer - first[1]))),
                          "mean_abs_dlogp_vs_shared": float(np.mean(np.abs(answer - first[1])))}), flush=True)


class StepTiming(NamedTuple):
    """A train step's median seconds, the process's peak device memory so far, and the step's own peak.

    Why both peaks: the process peak keeps whatever earlier workloads used (XLA's allocator does not give it
    back), so it reads above PyTorch's per-workload peak; the step's own peak is what its compiled program
    needs (arguments + outputs - donated aliases + temporaries, from XLA's memory analysis).
    """

    s: float
    process_peak_gb: float | None
    step_peak_gb: float | None
    compile_s: float
    reference_pass_s: float | None  # objective@once: one batch's reference forward, made before the steps


def unlearn_step_time(model: nnx.Module, objective: str, remat: str, batch: dict,
                      trainable=nnx.LoRAParam, layerwise_mode: str = "never") -> StepTiming:
    """Median time of the pipeline's own train step (trainer.prepare_step: the objective, AdamW with clipping and
    weight decay, donated state) on the `trainable` params (default: LoRA); every stream the objective reads gets
    `batch` (GD and NPO: forget and retain, NPO's reference forward included). layerwise_mode: the trainer's
    (`never`: the scanned step, one program; `always`: layer by layer, unlearn/layerwise.py), whose compile_s is
    then its first call (every program compiled and run once) and whose step peak is not counted (None)."""
    set_options(model, remat=remat)
    objective, _, reference = objective.partition("@")
    cfg = TrainConfig(objective=objective, lr=1e-5, weight_decay=0.01)
    obj = get_objective(objective)
    streams = {name: batch for phase in obj.phases for name in phase} | {s: batch for s in obj.optional}
    ref_pass_s = None
    if reference == "once":  # the reference's log-probs made before the step (unlearn/reference_pass.py)
        forward = reference_forward(model, trainable, logps_fn)
        ref_pass_s = timeit(lambda: forward(batch)[0])
        logps, mask = (np.asarray(x) for x in forward(batch))
        del forward  # it holds the stacked frozen weights, which the per-layer step replaces
        cached = reference_pass.cacheable(obj)
        obj = reference_pass.without_reference(obj, cached)
        values = reference_pass.packed([lp[m] for lp, m in zip(logps, mask.astype(bool), strict=True)],
                                       logps.shape[1])
        streams |= {name: {**batch, reference_pass.REF_VALUES: jnp.asarray(values)} for name in cached}
    tx, _ = make_optimizer(lr=cfg.lr, total_steps=100, weight_decay=cfg.weight_decay)
    # keep_unused: every argument stays a parameter of the program (jit drops unused ones, e.g. GA's reference),
    # so XLA's argument size counts each passed array, and the arrays passed twice are subtracted below.
    prepared = prepare_step(model, trainable, obj, tx, make_loss(obj, cfg, logps_fn, None),
                            layerwise_mode=layerwise_mode, keep_unused=True)
    state = [prepared.params, jax.jit(tx.init)(prepared.params), prepared.rng]
    # (rest, ref_other, ref_rest, grad_mask): the reference is the model itself with LoRA zeroed, no saliency
    fixed = (*prepared.fixed, nnx.State({}), streams)
    step_gb = None
    t0 = time.perf_counter()
    if prepared.frozen:
        state[0], state[1], state[2], loss, _ = prepared.step(*state, *fixed)
        jax.block_until_ready(loss)
    else:
        mem = prepared.step.lower(*state, *fixed).compile().memory_analysis()
        # XLA counts an array passed as two arguments twice (the reference's frozen params are the model's own).
        seen: set[int] = set()
        twice = 0
        for x in jax.tree.leaves((*state, *fixed)):
            twice += x.nbytes if id(x) in seen else 0
            seen.add(id(x))
        step_gb = (mem.argument_size_in_bytes - twice + mem.output_size_in_bytes - mem.alias_size_in_bytes
                   + mem.temp_size_in_bytes) / 2**30
    compile_s = time.perf_counter() - t0

    def run() -> jax.Array:
        # through jit, not an AOT program: on a mesh the step's outputs may come back placed otherwise than its
        # inputs went in (the AOT program would refuse them; jit compiles once more in the warm-up calls)
        state[0], state[1], state[2], loss, _ = prepared.step(*state, *fixed)
        return loss

    s = timeit(run)
    prepared.restore()
    nnx.update(model, state[0], state[2])  # the model's own LoRA and RNG arrays were donated to the first step
    model.eval()
    return StepTiming(s, peak_gb(), step_gb, compile_s, ref_pass_s)


if __name__ == "__main__":
    main()
