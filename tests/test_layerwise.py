"""The per-layer train step (unlearn/layerwise.py) against the scanned one on a tiny LoRA LLaVA, on this CPU.

Both forms run the same loss, optimizer and checkpoints: the losses, the updated params and the RNG state of a few
steps must agree to float rounding for every kind of decoder call the objectives make (forget and retain joined in
one pass, the LoRA-off reference, the KL stream's policy and reference calls, RMU's early stop at a hidden layer),
with trainable params before the decoder (the projector) and after it (none here but the final norm's input). A run
checkpointed by one form resumes in the other, and the model's stacked frozen weights come back bit for bit.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import monitoring

from tests.tiny_models import tiny_batch, tiny_config
from vlmu_jax.data.batching import IGNORE
from vlmu_jax.models import lora
from vlmu_jax.models.registry import init_model
from vlmu_jax.models.sharding import make_mesh
from vlmu_jax.stages import hidden_fn, kl_fn, logps_fn
from vlmu_jax.unlearn import layerwise
from vlmu_jax.unlearn.trainer import TrainConfig, train, use_layerwise

LAYERS = 3


class Rows:
    """A BatchSource over fixed batches of the tiny model's rows, answers = each row's last 4 tokens."""

    def __init__(self, seed: int, lengths=(6, 9, 7, 8)):
        self.batches = []
        for k in range(2):
            b = tiny_batch(list(lengths), seed=seed + k)
            real = b["attention_mask"].sum(1)
            pos = np.arange(b["input_ids"].shape[1])
            answer = (pos[None] >= real[:, None] - 4) & (pos[None] < real[:, None])
            b["labels"] = np.where(answer, b["input_ids"], IGNORE).astype(np.int32)
            self.batches.append(b)

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, index: int) -> dict:
        return self.batches[index % len(self.batches)]


def with_lora(model: nnx.Module) -> object:
    """LoRA (dropout on) with nonzero B on every projection of `model`'s language model, in train mode; returns what
    trains: the adapters and the projector (fully). Nonzero B: the policy differs from its LoRA-off reference and
    every LoRA A gets a gradient."""
    lora.apply_lora(model, rank=4, alpha=8.0, dropout=0.1, seed=0, targets=r"language_model.*_proj$")
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype),
                                   state))
    model.train()
    return lora.trainable_filter(lora=True, tune_mm_projector=True)


def tiny_lora_llava(mesh=None) -> tuple[nnx.Module, object]:
    """The tiny LLaVA with 3 decoder layers, `with_lora`."""
    config = tiny_config("llama").to_dict()
    config["text_config"]["num_hidden_layers"] = LAYERS
    model = init_model(config, seed=0, mesh=mesh)
    return model, with_lora(model)


def train_run(build, sources: dict, tmp: Path, objective: str, mode: str, steps: int = 3, mesh=None,
              **kw) -> tuple[list[float], nnx.State, nnx.Module]:
    """`steps` steps of `objective` on the model `build()` makes, the step layer by layer or not (`mode`): the losses,
    the trained params and the model."""
    model, trainable = build()
    cfg = TrainConfig(objective=objective, lr=5e-3, num_steps=steps, progress=False, layerwise=mode,
                      async_checkpoints=False, weight_decay=0.01, **kw)
    res = train(model, cfg, sources=sources, logps_fn=logps_fn, kl_fn=kl_fn, hidden_fn=hidden_fn,
                trainable=trainable, workdir=tmp / f"{objective}-{mode}", mesh=mesh)
    return res.losses, nnx.state(model, trainable), model


def run(tmp: Path, objective: str, mode: str, steps: int = 3, mesh=None, lengths=(6, 9, 7, 8),
        **kw) -> tuple[list[float], nnx.State, nnx.Module]:
    sources = {"forget": Rows(1, lengths), "retain": Rows(5, lengths)}
    return train_run(lambda: tiny_lora_llava(mesh), sources, tmp, objective, mode, steps, mesh, **kw)


def assert_close(a: nnx.State, b: nnx.State, atol: float) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.mark.parametrize("objective,kw", [("ga", {}), ("gd", {}), ("npo", {}), ("kl", {}),
                                          ("rmu", {"hidden_layer": 1})])
def test_layerwise_step_equals_scanned_step(tmp_path, objective, kw) -> None:
    assert_forms_agree(lambda mode: run(tmp_path, objective, mode, **kw), tiny_lora_llava)


def assert_forms_agree(run_form, build, atol: float | None = None) -> None:
    """`run_form(mode)` scanned and layer by layer: the same losses and trained params (to `atol`), and the model's
    stacked frozen weights back afterwards, the same bits as a fresh `build()`'s. Default atol: 1e-5, and 5e-4 with
    the frozen kernels joined (the default), whose other rounding Adam turns into ~1e-4 where a gradient is near
    zero (GD's, with session 28's masks: 9.3e-5 at one of 1024 elements; 1.26e-4 on a CPU with AVX-512 bf16
    instructions, session 32); both far below the ~lr = 5e-3 a wrong gradient moves a param by."""
    atol = atol or (5e-4 if layerwise.JOIN_FROZEN_KERNELS else 1e-5)
    losses, params, _ = run_form("never")
    lw_losses, lw_params, model = run_form("always")
    np.testing.assert_allclose(lw_losses, losses, rtol=1e-5, atol=1e-5)  # GD's loss can be near 0
    assert losses[0] != pytest.approx(losses[-1], rel=1e-4)  # the steps moved the model
    assert_close(lw_params, params, atol=atol)  # a wrong gradient moves a param by ~lr = 5e-3
    fresh, _ = build()
    frozen = lambda m: nnx.state(m.language_model.layers, nnx.Not(nnx.LoRAParam))  # noqa: E731
    for x, y in zip(jax.tree.leaves(frozen(model)), jax.tree.leaves(frozen(fresh)), strict=True):
        assert x.size and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("objective", ["ga", "npo"])
def test_layerwise_step_with_kernels_apart_equals_scanned_step(tmp_path, objective, monkeypatch) -> None:
    """The other tests run the per-layer step with the frozen q/k/v and gate/up kernels held joined (the default:
    one gemm each, each projection's LoRA and dropout mask its own); held apart, as the model stores them, it
    trains what the scanned step does too. (Apart is no family's special case: Mllama's layers were tested that way
    until session 27, and CI's time went to the joined default there.)"""
    monkeypatch.setattr(layerwise, "JOIN_FROZEN_KERNELS", False)
    assert_forms_agree(lambda mode: run(tmp_path, objective, mode), tiny_lora_llava)


def test_checkpoint_of_one_form_resumes_in_the_other(tmp_path) -> None:
    """The per-layer step keeps the scanned step's stacked params and optimizer state: a scanned run's checkpoint at
    step 2 of 4, resumed layer by layer, ends where the scanned run ended."""
    _, params, _ = run(tmp_path, "gd", "never", steps=4, save_every=2, keep_checkpoints=3)
    shutil.copytree(tmp_path / "gd-never" / "checkpoints" / "2", tmp_path / "gd-always" / "checkpoints" / "2")
    losses, resumed, _ = run(tmp_path, "gd", "always", steps=4, save_every=2, keep_checkpoints=3)
    assert len(losses) == 2  # steps 2 and 3 only
    assert_close(resumed, params, atol=1e-5)


def test_layerwise_step_on_a_mesh(tmp_path) -> None:
    """On 8 fake CPU devices (data=2, fsdp=2, tensor=2) the per-layer step computes what the scanned step does, and
    the trained and restored weights keep their placement."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    losses, params, _ = run(tmp_path, "gd", "never", mesh=mesh)
    lw_losses, lw_params, model = run(tmp_path, "gd", "always", mesh=mesh)
    np.testing.assert_allclose(lw_losses, losses, rtol=1e-5)
    assert_close(lw_params, params, atol=1e-5)
    placed = {tuple(map(str, p)): x.get_value().sharding
              for p, x in nnx.to_flat_state(nnx.state(model.language_model.layers))}
    for path in [("mlp", "gate_proj", "kernel"), ("self_attn", "q_proj", "lora_a")]:
        assert len(placed[path].device_set) == 8 and any(placed[path].spec), path


def test_auto_takes_the_scanned_step_on_cpu_and_always_names_what_it_cannot() -> None:
    model, trainable = tiny_lora_llava()
    params = nnx.state(model, trainable)
    assert jax.default_backend() != "gpu" and not use_layerwise("auto", model, params)
    assert use_layerwise("always", model, params) and layerwise.lora_only(model, params)
    assert not layerwise.lora_only(model, nnx.state(model, nnx.Param))  # a full finetune: auto keeps the scan
    with pytest.raises(ValueError, match="nothing in its decoder layers trains"):
        use_layerwise("always", model, nnx.state(model, nnx.PathContains("multi_modal_projector")))
    with pytest.raises(ValueError, match="choose auto, always or never"):
        use_layerwise("sometimes", model, params)
    assert jnp.ndim(params["language_model"]["layers"]["mlp"]["up_proj"]["lora_a"][...]) == 3  # stacked [L, ...]


def test_first_step_compiles_its_programs_ahead_in_threads(tmp_path, monkeypatch) -> None:
    """The first step over a batch shape compiles every program it runs (collect, the policy's and the reference's
    layers, replay, update) at once in compile threads; the step's own calls then compile nothing."""
    compiles, inside = [], []
    monitoring.register_event_duration_secs_listener(
        lambda name, _, **kw: compiles.append(threading.current_thread().name) if "backend_compile" in name else None)
    ahead, call = layerwise.LayerwiseStep._compile_ahead, layerwise.LayerwiseStep.__call__

    def counted_ahead(self, *args):
        before = len(compiles)
        ahead(self, *args)
        inside.append(("ahead", compiles[before:]))

    def counted_call(self, *args):
        before = len(compiles)
        out = call(self, *args)
        inside.append(("step", compiles[before:]))
        return out

    monkeypatch.setattr(layerwise.LayerwiseStep, "_compile_ahead", counted_ahead)
    monkeypatch.setattr(layerwise.LayerwiseStep, "__call__", counted_call)
    run(tmp_path, "npo", "always", steps=2, lengths=(5, 11, 6, 7))  # a batch shape of this test alone
    (_, in_ahead), (_, first), (_, second) = inside
    assert sum(name.startswith("compile") for name in in_ahead) == 6  # collect, policy fwd+bwd, plain, replay, update
    # besides the ahead block the first step compiled at most the slicing of its params into layers (another test
    # of this process may have compiled it), the second nothing
    assert len(first) - len(in_ahead) <= 1 and not second


def test_restore_frees_the_slices_a_step_shares(monkeypatch) -> None:
    """FrozenLayers swaps the stacked frozen decoder weights for stand-ins and back, holding each layer's q/k/v and
    gate/up kernels joined meanwhile (their LoRA apart); restoring empties the per-layer list in place, so the step
    holding that list no longer keeps a decoder's worth of slices alive, and splits the kernels again, bit for bit."""
    model, trainable = tiny_lora_llava()
    layers = model.language_model.layers
    kernels = [layers.mlp.up_proj.kernel, layers.mlp.gate_proj.kernel, layers.self_attn.k_proj.kernel,
               layers.mlp.down_proj.kernel]
    before = [np.asarray(k.get_value()) for k in kernels]
    monkeypatch.setattr(layerwise, "JOIN_FROZEN_KERNELS", True)
    frozen = layerwise.FrozenLayers(model, trainable)
    shared = frozen.layers
    assert len(shared) == LAYERS and all(k.get_value().size == 0 for k in kernels)
    attn, mlp = layers.self_attn, layers.mlp
    assert attn.qkv_kernel is not None and mlp.gate_up_kernel is not None and mlp.up_proj.lora_a is not None
    c = model.language_model.config
    width = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    layer0 = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(jax.tree.unflatten(frozen.treedefs[0],
                                                                                        shared[0]))}
    assert layer0[("self_attn", "qkv_kernel")].shape == (c.hidden_size, width)
    np.testing.assert_array_equal(np.asarray(layer0[("mlp", "gate_up_kernel")]),
                                  np.concatenate([before[1][0], before[0][0]], axis=-1))
    frozen.restore()
    assert shared == [] and attn.qkv_kernel is None and mlp.gate_up_kernel is None
    for k, b in zip(kernels, before, strict=True):
        np.testing.assert_array_equal(np.asarray(k.get_value()), b)


def test_frozen_layers_add_at_most_one_stacked_param_while_slicing(monkeypatch) -> None:
    """Live bytes while FrozenLayers takes the decoder apart and puts it back (each sampled where a stacked param and
    its slices coexist) rise over the model's own by at most its largest frozen stacked param: the kernels are
    joined layer by layer, after slicing. Joined as stacks, [gate | up] stood whole beside gate and up, twice the
    largest param here (on an H100, idefics2-8b's LoRA GA step peaked 3.3 GiB higher, bench/RESULTS.md session
    33)."""
    model, trainable = tiny_lora_llava()
    monkeypatch.setattr(layerwise, "JOIN_FROZEN_KERNELS", True)
    layers = model.language_model.layers
    largest = max(k.get_value().nbytes for k in (layers.mlp.gate_proj.kernel, layers.mlp.up_proj.kernel,
                                                 layers.mlp.down_proj.kernel, layers.self_attn.q_proj.kernel))
    assert largest < layers.mlp.gate_proj.kernel.get_value().nbytes + layers.mlp.up_proj.kernel.get_value().nbytes

    def live() -> int:
        return sum(x.nbytes for x in jax.live_arrays())

    seen = []

    def sampled(real):
        def call(*args):
            out = real(*args)
            seen.append(live())  # the stacked param and its slices both alive
            return out
        return call

    for name in ("unstack", "restack"):
        monkeypatch.setattr(layerwise, name, sampled(getattr(layerwise, name)))
    base = live()
    frozen = layerwise.FrozenLayers(model, trainable)
    frozen.restore()
    assert len(seen) > 10 and max(seen) - base <= largest


def test_update_program_reuses_the_collect_programs_vjp(tmp_path, monkeypatch) -> None:
    """The projector trains, so the update program applies the vjp of what runs before the decoder; it takes the
    collect program's residuals rather than tracing the model (its vision tower) again."""
    traced_in_update, tracing = [], []
    update, traced = layerwise.LayerwiseStep._update_fn, layerwise.LayerwiseStep._traced

    def update_fn(self, *args):
        tracing.append(True)
        try:
            return update(self, *args)
        finally:
            tracing.pop()

    def traced_fn(self, *args, **kw):
        traced_in_update.append(bool(tracing))
        return traced(self, *args, **kw)

    monkeypatch.setattr(layerwise.LayerwiseStep, "_update_fn", update_fn)
    monkeypatch.setattr(layerwise.LayerwiseStep, "_traced", traced_fn)
    run(tmp_path, "ga", "always", steps=1, lengths=(5, 10, 6, 8))
    assert traced_in_update and not any(traced_in_update)  # collect and replay traced the model, update did not


def test_lora_only_step_leaves_out_the_first_layers_input_gradient(tmp_path, monkeypatch) -> None:
    """With only LoRA training (nothing before the decoder: PEFT's LoRA-only step), the first layer's backward
    returns its weights' gradients alone, so XLA drops the gemms that only feed its input's cotangent. The step
    still trains what the scanned step does, and with the projector training (the other tests) the full backward
    runs for every layer."""
    calls: list[tuple] = []
    init = layerwise.LayerProgram.__init__

    def counted_init(self, *args, **kw):
        init(self, *args, **kw)
        weights_backward = self.weights_backward

        def counted(*a):
            calls.append((self, a))
            return weights_backward(*a)

        counted.lower = weights_backward.lower
        self.weights_backward = counted

    monkeypatch.setattr(layerwise.LayerProgram, "__init__", counted_init)

    def lora_only():
        model, _ = tiny_lora_llava()
        return model, lora.trainable_filter(lora=True)

    sources = {"forget": Rows(1), "retain": Rows(5)}
    assert_forms_agree(lambda mode: train_run(lora_only, sources, tmp_path, "ga", mode), lora_only)
    assert len(calls) == 3  # the first layer of each of the 3 steps' one policy call
    program, args = calls[0]
    dots = lambda fn: fn.lower(*args).compile().as_text().count(" dot(")  # noqa: E731
    assert dots(program.weights_backward) < dots(program.backward)
