"""Scoring with shared prompts (config eval.shared_prompts): each prompt runs once and the answers that repeat it
run as continuations over its KV cache; every answer token's values are those of scoring its whole row."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

from configs.demo import get_config
from tests.tiny_models import causal_without_mask
from vlmu_jax.data.batching import IGNORE, encode
from vlmu_jax.eval.batched import prompt_groups, score_rows
from vlmu_jax.eval.tasks.fiubench import scoring_examples
from vlmu_jax.pipeline import Workspace, prepare_base_model, prepare_data

FAMILIES = {  # architecture -> (template, tiny-shape overrides)
    "llava": ("llava-1.5", {}),
    "llava_phi3": ("llava-phi", {"architecture": "llava", "text_model": "phi3"}),
    "idefics2": ("idefics2", {}),
    "mllama": ("llama-3.2-vision", {"hidden_size": 32, "intermediate_size": 64, "vision_hidden_size": 16}),
    "qwen2_vl": ("qwen2-vl", {}),
}


@functools.cache
def _rows(tmp_path, family: str):
    """(workspace, FIUBench scoring rows of two identities, rows per question) of a tiny `family` model, built
    once per family for the module."""
    template, shape = FAMILIES[family]
    config = get_config("ci")
    config.model.template = template
    config.model.tiny_shape.update(**{"architecture": family, **shape})
    config.data.synthetic_identities = 4
    ws = Workspace(config, tmp_path)
    prepare_data(ws)
    prepare_base_model(ws)
    examples, k = scoring_examples(ws.bench.identities[:2])
    return ws, [encode(e, ws.eval_text_config) for e in examples], 2 + k


def _with_images_seen(ws: Workspace):
    """The base model with Mllama's cross-attention gates opened: they start at tanh(0) = 0, where no image reaches
    the text (and so no test could tell one image input from another)."""
    model = ws.load("base")
    for path, node in nnx.iter_graph(model):
        if path and path[-1] in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
            node.set_value(node.get_value() + 0.5)
    return model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_prompt_scores_equal_whole_rows(root, family, monkeypatch) -> None:
    """Also with the prompts' attention run as cuDNN's fused causal kernel runs it on GPU (no padding mask): the
    prefill moves each left-padded prompt's tokens to the front first (Mllama keeps XLA's masked attention)."""
    causal_without_mask(monkeypatch)
    ws, rows, per_question = _rows(root / family, family)
    groups = prompt_groups(rows)
    # FIUBench's rows: one prompt per question, its ground-truth, paraphrased and perturbed answers after it.
    assert groups is not None and len(groups.prompts) == len(rows) // per_question
    assert all(len(m) == per_question for m in groups.members)
    model = ws.load("base")
    kwargs = dict(batch_size=4, pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.eval_image_fn)
    whole = score_rows(model, rows, **kwargs)
    shared = score_rows(model, rows, shared_prompts=True, **kwargs)
    for w, s, r in zip(whole, shared, rows, strict=True):
        assert s.logps.shape == w.logps.shape == (int((r.labels != IGNORE).sum()),)
        np.testing.assert_allclose(s.logps, w.logps, rtol=0, atol=2e-5)
        np.testing.assert_allclose(s.mu, w.mu, rtol=0, atol=2e-5)
        # var = E[log p^2] - mu^2 cancels two numbers near (log V)^2 ~ 40: float32 rounding of 1e-6 is 4e-5 here.
        np.testing.assert_allclose(s.var, w.var, rtol=0, atol=2e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_embeddings_made_once_score_and_generate_as_pixels(root, family) -> None:
    """config eval.image_embeddings_mb: batches carry each image's features (Mllama: its projected vision states),
    made once per image (and once for the text-only blank), and every score and generation is what the pixels
    give."""
    from vlmu_jax.eval.batched import generate_rows
    from vlmu_jax.eval.frozen import frozen
    from vlmu_jax.eval.layer_copies import layer_copies
    from vlmu_jax.image_embeddings import embedded_image_fn
    from vlmu_jax.models.architecture import IMAGE_EMBEDDINGS

    ws, rows, _ = _rows(root / family, family)
    model = _with_images_seen(ws)
    made = []

    def pixels(ref):
        made.append(ref)
        return ws.eval_image_fn(ref)

    with pytest.raises(ValueError, match="frozen"):  # batches are made in threads: only a frozen model allows it
        embedded_image_fn(model, pixels, 10**9, None)
    kwargs = dict(batch_size=4, pad_token_id=ws.tokenizer.pad_token_id)
    prompts = prompt_groups(rows).prompts
    generating = dict(eos_token_id=ws.tokenizer.eos_token_id, max_new_tokens=3)
    want = {shared: score_rows(model, rows, image_fn=ws.eval_image_fn, shared_prompts=shared, **kwargs)
            for shared in (False, True)}
    want_tokens = generate_rows(model, prompts, image_fn=ws.eval_image_fn, **kwargs, **generating)
    # as the eval stage runs it on a GPU: over per-layer weight copies, the model frozen
    with layer_copies(model, "always"), frozen(model, compile_ahead=False):
        embedded = embedded_image_fn(model, pixels, 10**9, None)
        assert embedded(rows[0].image)[IMAGE_EMBEDDINGS].shape[-1] == model.config.text.hidden_size
        for shared in (False, True):
            got = score_rows(model, rows, image_fn=embedded, shared_prompts=shared, **kwargs)
            for g, w in zip(got, want[shared], strict=True):
                np.testing.assert_allclose(g.logps, w.logps, rtol=0, atol=2e-5)
                np.testing.assert_allclose(g.mu, w.mu, rtol=0, atol=2e-5)
        tokens = generate_rows(model, prompts, image_fn=embedded, **kwargs, **generating)
    for g, w in zip(tokens, want_tokens, strict=True):
        np.testing.assert_array_equal(g, w)
    images = {r.image for r in rows}
    assert len(images) == 2 and len(made) == len(set(made)) and set(made) <= images | {None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vision_states_train_the_projector_as_pixels(root, family) -> None:
    """FIUBench's unlearning trains the projector, not the tower: batches then carry each image's tower states
    (`vision_states`, made once per image and batched with the inputs the projector still reads), and the hidden
    states and the projector's gradients are those of the pixels."""
    import jax
    import jax.numpy as jnp

    from vlmu_jax.data.batching import collate
    from vlmu_jax.image_embeddings import stage_image_fn
    from vlmu_jax.models.architecture import VISION_STATES

    ws, rows, _ = _rows(root / family, family)
    model = _with_images_seen(ws)
    refs = {ref for row in rows[:4] for ref in row.images}
    made, size = stage_image_fn(model, ws.eval_image_fn, refs, 10**9, None, 3, VISION_STATES)
    # the images' and the blank's states and what the projector reads beside them
    assert size == sum(a.nbytes for ref in [None, *refs] for a in made(ref).values())
    assert stage_image_fn(model, ws.eval_image_fn, refs, size - 1, None, 3, VISION_STATES) == (None, size)
    pixels = collate(rows[:4], pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.eval_image_fn)
    carried = collate(rows[:4], pad_token_id=ws.tokenizer.pad_token_id, image_fn=made)
    assert "pixel_values" not in carried["images"] and set(carried["images"]) == {VISION_STATES,
                                                                                 *model.KEPT_WITH_STATES}

    def loss(model, batch):
        h = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                  jax.tree.map(jnp.asarray, batch["images"]))
        return jnp.sum(jnp.where(batch["attention_mask"][..., None] > 0, h, 0) ** 2), h

    projector = nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains("multi_modal_projector")))
    grad = nnx.value_and_grad(loss, argnums=projector, has_aux=True)
    (want, want_h), want_grads = grad(model, pixels)
    (got, got_h), got_grads = grad(model, carried)
    assert jax.tree.leaves(want_grads)
    np.testing.assert_allclose(got_h, want_h, rtol=0, atol=2e-5)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert float(jnp.abs(w).max()) > 0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.abs(w).max()))


def test_what_keeps_a_training_stage_on_pixels(root) -> None:
    """A stage's batches start past the image path's frozen part: its features while nothing on it trains (a
    LoRA-only stage), the tower's states while only the projector trains (tuned beside LoRA), pixels while the
    tower trains; and only while a reference model holds the same values in what makes them."""
    from vlmu_jax.image_embeddings import same_image_path, training_cut
    from vlmu_jax.models import lora
    from vlmu_jax.models.architecture import IMAGE_EMBEDDINGS, VISION_STATES

    ws, _, _ = _rows(root / "llava", "llava")
    model, other = ws.load("base"), ws.load("base")
    lora.apply_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=ws.protocol.lora_targets, seed=0)
    assert training_cut(model, lora.trainable_filter(lora=True)) == IMAGE_EMBEDDINGS
    assert training_cut(model, lora.trainable_filter(lora=True, tune_mm_projector=True)) == VISION_STATES
    assert training_cut(model, lora.trainable_filter(lora=True, tune_vision_tower=True)) is None
    assert same_image_path(model, other, IMAGE_EMBEDDINGS) and same_image_path(model, other, VISION_STATES)
    kernel = other.multi_modal_projector.linear_1.kernel
    kernel.set_value(kernel.get_value() + 1e-3)
    assert not same_image_path(model, other, IMAGE_EMBEDDINGS) and same_image_path(model, other, VISION_STATES)
    kernel = other.vision_tower.pre_layrnorm.weight
    kernel.set_value(kernel.get_value() + 1e-3)
    assert not same_image_path(model, other, VISION_STATES)


def test_shared_prompts_on_a_mesh_equal_one_device(root) -> None:
    """On the 8 fake CPU devices, mesh (data=2, fsdp=2, tensor=2): prompts split over (data, fsdp), weights over
    (fsdp, tensor), the prompt's cache and its continuations sharded; the scores are one device's whole rows."""
    from vlmu_jax.checkpoints.hf_import import load_pretrained
    from vlmu_jax.models.sharding import make_mesh

    ws, rows, _ = _rows(root / "llava", "llava")
    kwargs = dict(batch_size=4, pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.eval_image_fn)
    whole = score_rows(load_pretrained(ws.base_model), rows, **kwargs)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = load_pretrained(ws.base_model, mesh=mesh)
    shared = score_rows(sharded, rows, mesh=mesh, shared_prompts=True, **kwargs)
    from vlmu_jax.eval.frozen import frozen
    from vlmu_jax.image_embeddings import embedded_image_fn  # each image's features made on the mesh too

    with frozen(sharded, compile_ahead=False):
        embedded = score_rows(sharded, rows, mesh=mesh, shared_prompts=True,
                              **{**kwargs, "image_fn": embedded_image_fn(sharded, ws.eval_image_fn, 10**9, mesh)})
    # Batches of 8 prompts, those too long for the token cap in batches of 4 (one per data-parallel shard).
    from vlmu_jax.eval.batched import BatchCap, _eval_source, _SplitSource

    prompts = prompt_groups(rows).prompts
    cap = 4 * max(len(p.input_ids) for p in prompts)
    assert isinstance(_eval_source(prompts, 8, ws.tokenizer.pad_token_id, ws.eval_image_fn, left_pad=True,
                                   cap=BatchCap(tokens=cap), mesh=mesh), _SplitSource)
    capped = score_rows(load_pretrained(ws.base_model, mesh=mesh), rows, mesh=mesh, shared_prompts=True,
                        cap=BatchCap(tokens=cap), **{**kwargs, "batch_size": 8})
    for w, s, c, e in zip(whole, shared, capped, embedded, strict=True):
        np.testing.assert_allclose(s.logps, w.logps, rtol=0, atol=2e-5)
        np.testing.assert_allclose(e.logps, w.logps, rtol=0, atol=2e-5)
        np.testing.assert_allclose(s.mu, w.mu, rtol=0, atol=2e-5)
        np.testing.assert_allclose(c.logps, w.logps, rtol=0, atol=2e-5)


def test_rows_without_a_prompt_are_not_grouped() -> None:
    from vlmu_jax.data.batching import Encoded

    row = Encoded(np.arange(5, dtype=np.int32), np.array([3, 4, 5, 6, 7], np.int32), None)
    assert prompt_groups([row]) is None  # its first token is an answer token: nothing before it to share
    a = Encoded(np.array([1, 2, 3, 9], np.int32), np.array([IGNORE, IGNORE, 3, 9], np.int32), None)
    b = Encoded(np.array([1, 2, 4, 4, 8], np.int32), np.array([IGNORE, IGNORE, 4, 4, 8], np.int32), None)
    c = Encoded(np.array([1, 5, 4], np.int32), np.array([IGNORE, IGNORE, 4], np.int32), None)
    groups = prompt_groups([a, b, c])
    assert groups.members == [[0, 1], [2]]
    np.testing.assert_array_equal(groups.prompts[0].input_ids, [1, 2])
    assert (groups.prompts[0].labels == IGNORE).all()


@pytest.mark.parametrize("placement", ["mesh", "one-device mesh", "one device"])
def test_compile_ahead_covers_the_shared_programs(root, placement: str) -> None:
    """On a frozen model, compile_ahead with shared prompts compiles every program the scoring and generation then
    run: each prompt pass (eval/prefill.py) and the programs over its cache (every (prompt length, answers per
    prompt, continuation length) shape and the decode loop), with the per-layer weight copies evaluation uses on
    GPU attached. The scoring and generation compile nothing, and give what they give when nothing is compiled
    ahead. On the 8-device mesh the programs over a cache compile after its prompt pass (XLA places its outputs);
    on one device, a 1-device mesh as a single-GPU run has, they take the placement and compile side by side."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from vlmu_jax.eval.batched import compile_ahead, generate_rows
    from vlmu_jax.eval.frozen import frozen
    from vlmu_jax.eval.layer_copies import layer_copies
    from vlmu_jax.models.sharding import make_mesh, shard_model

    jax.clear_caches()  # what an earlier test of this file compiled for the same shapes would not count here
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    ws, rows, _ = _rows(root / "llava", "llava")
    rows = rows[:-3]  # the last question keeps 4 of its answers: its batch may need another shape
    prompts = prompt_groups(rows).prompts
    model = ws.load("base")
    if placement == "one-device mesh":
        shard_model(model, make_mesh(devices=jax.devices()[:1]))
    elif placement == "one device":
        nnx.update(model, jax.device_put(nnx.state(model), SingleDeviceSharding(jax.devices()[0])))
    kwargs = dict(batch_size=4, pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.eval_image_fn)
    generating = dict(eos_token_id=ws.tokenizer.eos_token_id, max_new_tokens=3)
    want_scores = score_rows(model, rows, shared_prompts=True, **kwargs)
    want_tokens = generate_rows(model, prompts, **kwargs, **generating)
    with layer_copies(model, "always"), frozen(model):
        before = len(compiles)
        compile_ahead(model, to_score=[rows], to_generate=[prompts], shared_prompts=True, **kwargs, **generating)()
        ahead = len(compiles) - before
        scores = score_rows(model, rows, shared_prompts=True, **kwargs)
        tokens = generate_rows(model, prompts, **kwargs, **generating)
        after = len(compiles) - before - ahead  # (leaving the block compiles the stack's rebuild)
    assert ahead >= 3  # a prompt pass (one for scoring and generation: eval/prefill.cache_room), the answers, the loop
    assert after == 0, f"{after} compilations after compile_ahead"
    leaf = jax.tree.leaves(nnx.state(model))[0].sharding
    assert (placement == "one device") == isinstance(leaf, SingleDeviceSharding)
    if placement == "one-device mesh":
        assert isinstance(leaf, NamedSharding) and leaf.mesh.size == 1 and leaf.spec != PartitionSpec()
    for a, b in zip(scores, want_scores, strict=True):
        np.testing.assert_allclose(a.logps, b.logps, rtol=1e-5, atol=1e-5)
    for a, b in zip(tokens, want_tokens, strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_flag_reaches_the_fiubench_split(root) -> None:
    """config eval.shared_prompts (on by default) goes through the eval stage's runner into FIUBench's model
    evaluation, whose logged losses, truth ratios and MIA scores (forget and retain) then match scoring every row
    whole; APE's log, from generation alone, is the same either way."""
    import dataclasses

    from vlmu_jax import stages
    from vlmu_jax.eval.tasks.fiubench import evaluate_model, prepare

    ws, _, _ = _rows(root / "llava", "llava")
    ws.config.eval.max_new_tokens = 2
    runner = stages._runner(ws)
    assert ws.config.eval.shared_prompts and runner.shared_prompts
    model = ws.load("base")
    forget, retain = ws.bench.identities[:2], ws.bench.identities[2:3]
    inputs = prepare(forget, retain, runner)
    shared = evaluate_model(model, inputs, runner)
    whole = evaluate_model(model, inputs, dataclasses.replace(runner, shared_prompts=False))
    assert shared[2] == whole[2] and len(shared[2]["question"]) > 0

    def numbers(x) -> list[float]:
        """Every number in the logged structure, in a fixed order."""
        if isinstance(x, dict):
            return [v for k in sorted(x) for v in numbers(x[k])]
        if isinstance(x, (list, tuple, np.ndarray)):
            return [v for item in list(x) for v in numbers(item)]
        return [float(x)] if isinstance(x, (int, float, np.number)) and not isinstance(x, bool) else []

    got, want = numbers(shared), numbers(whole)
    assert len(got) == len(want) > 50
    # Mink++ divides by the variance, whose float32 rounding the parity test above bounds: 1e-3 relative.
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_fiubench_passes_make_each_image_features_at_most_twice(root) -> None:
    """With a features cache that holds more than either split's images but fewer than both, FIUBench's five passes
    (forget and retain scoring, then retain's, forget's and APE's generation) make each image's features at most
    twice: each pass first shows the images the one before it showed last. (Scoring both splits, then generating
    forget, retain and APE made each forget image's three times: Llama-3.2-11B-Vision's 52 MB features against the
    4 GB default, bench/RESULTS.md session 34.)"""
    import dataclasses
    from collections import Counter

    from vlmu_jax import stages
    from vlmu_jax.eval.frozen import frozen
    from vlmu_jax.eval.tasks.fiubench import evaluate_model, prepare
    from vlmu_jax.image_embeddings import embedded_image_fn

    ws, _, _ = _rows(root / "llava", "llava")
    ws.config.eval.max_new_tokens = 2
    runner = stages._runner(ws)
    model = ws.load("base")
    forget, retain = ws.bench.identities[:2], ws.bench.identities[2:4]
    made: Counter = Counter()

    def pixels(ref):
        made[ref] += 1
        return ws.eval_image_fn(ref)

    with frozen(model, compile_ahead=False):
        one = sum(a.nbytes for a in embedded_image_fn(model, ws.eval_image_fn, 10**9, None)(forget[0].image).values())
        embedded = embedded_image_fn(model, pixels, 3 * one + one // 2, None)  # three images' features
        evaluate_model(model, prepare(forget, retain, runner), dataclasses.replace(runner, image_fn=embedded))
    made.pop(None, None)  # the text-only blank (a batch slot's size)
    counts = {ref.path.rsplit("/", 1)[-1]: n for ref, n in made.items()}
    assert set(made) == {ident.image for ident in [*forget, *retain]} and max(counts.values()) == 2, counts


def test_compile_ahead_compiles_the_features_program_without_running_it(root, monkeypatch) -> None:
    """Where each image's features are the batches' images (image_embeddings.embedded_image_fn), compile-ahead's
    sample batches compile the features program beside the scoring and generation programs, with zeros of its
    outputs' shapes standing for its values, which are never kept: each image's features run once (while the
    scoring program compiles, or in the pass), and the features made after compile-ahead compile nothing. The
    scores after it are the model's own (no zeros leaked into the features cache)."""
    import threading

    from jax import monitoring

    from vlmu_jax import image_embeddings
    from vlmu_jax.eval.batched import compile_ahead
    from vlmu_jax.eval.frozen import compiling, frozen

    ws, rows, _ = _rows(root / "llava", "llava")
    model = ws.load("base")
    common = dict(batch_size=5, pad_token_id=ws.tokenizer.pad_token_id)  # a batch size of this test alone
    want = score_rows(model, rows, image_fn=ws.eval_image_fn, **common)
    runs, compiles = [], []  # (compile-only?) per features call; the compiling threads' names
    features = image_embeddings._image_inputs

    def counted(*args, **kwargs):
        runs.append(compiling())
        return features(*args, **kwargs)

    monkeypatch.setattr(image_embeddings, "_image_inputs", counted)
    monitoring.register_event_duration_secs_listener(
        lambda name, _, **kw: compiles.append(threading.current_thread().name) if "backend_compile" in name else None)
    with frozen(model, compile_ahead=True):
        embedded = image_embeddings.embedded_image_fn(model, ws.eval_image_fn, 10**9, None)
        compile_ahead(model, to_score=[rows], to_generate=[prompt_groups(rows).prompts], image_fn=embedded,
                      eos_token_id=ws.tokenizer.eos_token_id, max_new_tokens=2, **common)()
        in_ahead, ahead_compiles = list(runs), len(compiles)
        got = score_rows(model, rows, image_fn=embedded, **common)
    assert in_ahead[0]  # the sample batches asked for features compile-only, before any ran
    images = {ref for row in rows for ref in row.images}
    assert runs.count(False) == len(images)  # each image's features ran once, none kept from the compile-only calls
    assert ahead_compiles >= 2 and compiles[ahead_compiles:] == []  # the passes compiled nothing, features included
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.logps, w.logps, rtol=0, atol=2e-5)


def test_the_first_pass_images_features_are_made_while_its_program_compiles(root, monkeypatch) -> None:
    """While compile-ahead waits for the scoring programs, the devices make the first scoring pass's images'
    features (kept in the features cache), so that pass makes none. Here the scoring program's compile is held until
    they are all made, so it is seen whatever the CPU's speed; the scores are the model's own."""
    import threading

    from vlmu_jax import image_embeddings
    from vlmu_jax.eval import batched
    from vlmu_jax.eval.frozen import compiling, frozen

    ws, rows, _ = _rows(root / "llava", "llava")
    model = ws.load("base")
    common = dict(batch_size=5, pad_token_id=ws.tokenizer.pad_token_id)
    want = score_rows(model, rows, image_fn=ws.eval_image_fn, **common)
    images = {ref for row in rows for ref in row.images}
    made, all_made = [], threading.Event()  # images whose features ran (not compile-only)
    features, score = image_embeddings._image_inputs, batched._score_batch

    def counted(*args, **kwargs):
        if not compiling():
            made.append(threading.current_thread().name)
            if len(made) == len(images):
                all_made.set()
        return features(*args, **kwargs)

    def held(*args, **kwargs):  # the scoring program's compile-only call, in compile-ahead's threads
        assert all_made.wait(timeout=60), f"{len(made)} of {len(images)} features made while scoring compiled"
        return score(*args, **kwargs)

    monkeypatch.setattr(image_embeddings, "_image_inputs", counted)
    monkeypatch.setattr(batched, "_score_batch", held)
    with frozen(model, compile_ahead=True):
        embedded = image_embeddings.embedded_image_fn(model, ws.eval_image_fn, 10**9, None)
        batched.compile_ahead(model, to_score=[rows], image_fn=embedded, eos_token_id=ws.tokenizer.eos_token_id,
                              max_new_tokens=2, **common)()
        in_ahead = list(made)
        monkeypatch.setattr(batched, "_score_batch", score)
        got = score_rows(model, rows, image_fn=embedded, **common)
    assert len(in_ahead) == len(images) and set(in_ahead) == {threading.main_thread().name}
    assert made == in_ahead  # the pass made no features: each came from the cache
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.logps, w.logps, rtol=0, atol=2e-5)


def test_a_pass_under_an_image_cap_sizes_its_slots_without_running_the_features(root, monkeypatch) -> None:
    """A pass under an image cap (eval.max_batch_image_mb) needs one image slot's bytes when it is built: with each
    image's features as the batches' images, they come from a trace of the features program (`shapes_only`), which
    neither compiles nor runs it, and the stand-in is not kept. The pass then makes each image's features once and
    its scores are the model's own."""
    import threading

    from jax import monitoring

    from vlmu_jax import image_embeddings
    from vlmu_jax.eval.batched import BatchCap, run_passes, score_pass
    from vlmu_jax.eval.frozen import abstract_calls, frozen

    ws, rows, _ = _rows(root / "llava", "llava")
    model = ws.load("base")
    common = dict(batch_size=5, pad_token_id=ws.tokenizer.pad_token_id)
    want = score_rows(model, rows, image_fn=ws.eval_image_fn, **common)
    runs, compiles = [], []  # per features call: whether it ran; the programs compiled
    features = image_embeddings._image_inputs

    def counted(*args, **kwargs):
        runs.append(not abstract_calls())
        return features(*args, **kwargs)

    def on_compile(event: str, start: float, end: float, **kwargs) -> None:
        if event.endswith("backend_compile_duration"):
            compiles.append((threading.current_thread().name, kwargs.get("fun_name")))

    monkeypatch.setattr(image_embeddings, "_image_inputs", counted)
    monitoring.register_event_time_span_listener(on_compile)
    try:
        with frozen(model, compile_ahead=False):
            embedded = image_embeddings.embedded_image_fn(model, ws.eval_image_fn, 10**9, None)
            scores = score_pass(model, rows, image_fn=embedded, cap=BatchCap(image_bytes=10**9), **common)
            assert runs == [False] and compiles == []  # the slot's size: one shapes-only call, nothing compiled
            run_passes([scores])
    finally:
        monitoring.unregister_event_time_span_listener(on_compile)
    assert runs.count(True) == len({ref for row in rows for ref in row.images})  # each image made once, for real
    for g, w in zip(scores.out, want, strict=True):
        np.testing.assert_allclose(g.logps, w.logps, rtol=0, atol=2e-5)
