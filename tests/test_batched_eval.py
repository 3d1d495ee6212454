"""A whole split is scored and generated in a handful of compiled shapes, and results come back in row order."""

from __future__ import annotations

import dataclasses
import json
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from configs.demo import get_config
from tests.stand_in_stage import compiles_around_the_first_load, stand_in_config
from vlmu_jax.data.batching import encode, examples_from, generation_rows
from vlmu_jax.eval.batched import Pass, generate_pass, generate_rows, run_passes, score_pass, score_rows
from vlmu_jax.pipeline import Workspace, prepare_base_model, prepare_data


class CompileCounter:
    """Counts XLA backend compilations through jax.monitoring while active."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COUNTER = CompileCounter()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    config = get_config("ci")
    ws = Workspace(config, tmp_path_factory.mktemp("ws"))
    prepare_data(ws)
    prepare_base_model(ws)
    return ws


def _rows_of_several_lengths(ws: Workspace, n: int) -> tuple[list, list]:
    """Scoring rows of `n` examples plus a third of them with answers twelve times as long (padded to more than one
    length), and generation prompts of the first ten."""
    examples = examples_from(ws.bench.identities)[:n]
    long = [dataclasses.replace(e, answer=" ".join([e.answer] * 12)) for e in examples[::3]]
    return [encode(e, ws.text_config) for e in examples + long], generation_rows(examples[:10], ws.text_config)


def test_split_scored_in_few_compiled_shapes(workspace: Workspace) -> None:
    ws = workspace
    model = ws.load("base")
    examples = examples_from(ws.bench.identities)
    rows = [encode(e, ws.text_config) for e in examples]
    kwargs = dict(pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.image_fn)
    lengths = {len(r.input_ids) for r in rows}
    assert len(lengths) > 3  # rows really differ in length
    COUNTER.active, COUNTER.count = True, 0
    scores = score_rows(model, rows, batch_size=16, **kwargs)
    first = COUNTER.count
    again = score_rows(model, rows[::-1], batch_size=16, **kwargs)
    second = COUNTER.count - first
    COUNTER.active = False
    assert len(scores) == len(rows) and all(s is not None for s in scores)
    assert 1 <= first <= 4, f"{first} compilations for {len(rows)} rows of {len(lengths)} lengths"
    assert second == 0
    for s, r in zip(scores, rows, strict=True):  # one score per answer token, same values in any order
        assert s.logps.shape == (int((r.labels != -100).sum()),)
    for a, b in zip(scores, again[::-1], strict=True):
        np.testing.assert_allclose(a.logps, b.logps, rtol=1e-5, atol=1e-5)


def test_generation_in_row_order(workspace: Workspace) -> None:
    ws = workspace
    model = ws.load("base")
    examples = examples_from(ws.bench.identities[:3])
    prompts = generation_rows(examples, ws.text_config)
    kwargs = dict(pad_token_id=ws.tokenizer.pad_token_id, eos_token_id=ws.tokenizer.eos_token_id,
                  max_new_tokens=6, image_fn=ws.image_fn)
    batched = generate_rows(model, prompts, batch_size=8, **kwargs)
    alone = generate_rows(model, prompts[4:5], batch_size=8, **kwargs)
    assert len(batched) == len(prompts)
    np.testing.assert_array_equal(batched[4], alone[0])


def test_compile_ahead_compiles_every_shape_before_the_calls(workspace: Workspace,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On a frozen model `compile_ahead` compiles, in threads, the scoring program of every padded length and the
    generation programs. It returns once the scoring programs are compiled, with generation's still compiling
    (here held until the scores are in), and the function it returns waits for those. The calls after it compile
    nothing and give what the unfrozen model gives. On a model that is not frozen it compiles nothing, and
    compile-only calls run nothing."""
    from vlmu_jax.eval import batched
    from vlmu_jax.eval.batched import _first_of_each_length, _score_source, compile_ahead
    from vlmu_jax.eval.frozen import compile_only, frozen
    from vlmu_jax.eval.scoring import token_logprobs

    ws = workspace
    model = ws.load("base")
    rows, prompts = _rows_of_several_lengths(ws, 36)
    common = dict(batch_size=12, pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.image_fn)  # a fresh batch size
    generating = dict(eos_token_id=ws.tokenizer.eos_token_id, max_new_tokens=5)
    lengths = len(_first_of_each_length(_score_source(rows, 12, common["pad_token_id"], ws.image_fn)))
    assert lengths >= 2  # several scoring programs to compile at once
    want_scores = score_rows(model, rows, **common)
    want_tokens = generate_rows(model, prompts, **common, **generating)
    release, generate = threading.Event(), batched._generate_batch

    def held(*args, **kwargs):
        assert release.wait(timeout=600)
        return generate(*args, **kwargs)

    monkeypatch.setattr(batched, "_generate_batch", held)
    COUNTER.active, COUNTER.count = True, 0
    compile_ahead(model, to_score=[rows], to_generate=[prompts], **common, **generating)()
    unfrozen = COUNTER.count
    with frozen(model):
        ready = compile_ahead(model, to_score=[rows], to_generate=[prompts], **common, **generating)
        at_return = COUNTER.count - unfrozen
        scores = score_rows(model, rows, **common)
        scored = COUNTER.count - unfrozen - at_return
        release.set()
        ready()
        ahead = COUNTER.count - unfrozen - scored
        with compile_only() as programs:
            ids = np.ones((12, 40), np.int32)
            out = token_logprobs(model, ids, ids, None)
        # nothing ran: the call gave its output's shape, for a program that takes it to compile against
        assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == (12, 39)
        # The compiled program comes back (its memory analysis gives a call's own peak). A text-only call reads
        # the decoder and the output head: jit drops the unused vision tower and projector from its arguments.
        (program,) = programs
        state = nnx.state(model)
        text_path = sum(x.nbytes for x in jax.tree.leaves((state["language_model"], state["lm_head"])))
        assert program.memory_analysis().argument_size_in_bytes == text_path + 2 * ids.nbytes
        tokens = generate_rows(model, prompts, **common, **generating)
        after = COUNTER.count - unfrozen - ahead - scored
    COUNTER.active = False
    assert unfrozen == 0
    assert at_return >= lengths, f"{at_return} compilations when compile_ahead returned, {lengths} scoring lengths"
    assert scored == 0, f"{scored} compilations while scoring after compile_ahead"
    assert ahead >= lengths + 2, f"{ahead} compilations ahead for {lengths} scoring lengths and generation's two"
    assert after == 1, f"{after} compilations after compile_ahead"  # the compile-only call's own [12, 40] shape
    for a, b in zip(scores, want_scores, strict=True):
        np.testing.assert_allclose(a.logps, b.logps, rtol=1e-5, atol=1e-5)
    for a, b in zip(tokens, want_tokens, strict=True):
        np.testing.assert_array_equal(a, b)


def test_passes_run_as_one_overlapped_stream() -> None:
    """A pass's first batch is made and dispatched before the pass before it has its last batch collected (the
    devices are not left idle between passes), every batch is collected once with its own call's output, in order,
    and a pass's batches are made only when the stream reaches it."""
    events: list[str] = []

    def make(name: str, n: int) -> Pass:
        def batches():
            for i in range(n):
                events.append(f"make {name}{i}")
                yield f"{name}{i}"

        out: list[str] = []
        return Pass(batches(), lambda b: events.append(f"dispatch {b}") or f"out {b}",
                    lambda b, res: (events.append(f"collect {b}"), out.append(res)), out)

    first, second = make("a", 2), make("b", 2)
    assert events == []  # nothing made before the passes run
    run_passes([first, second])
    assert events == ["make a0", "dispatch a0", "make a1", "dispatch a1", "collect a0",
                      "make b0", "dispatch b0", "collect a1", "make b1", "dispatch b1", "collect b0", "collect b1"]
    assert first.out == ["out a0", "out a1"] and second.out == ["out b0", "out b1"]


def test_passes_together_equal_passes_alone(workspace: Workspace) -> None:
    """Scoring and generation run as one stream give every row what each gives run alone."""
    ws = workspace
    model = ws.load("base")
    examples = examples_from(ws.bench.identities)[:20]
    rows = [encode(e, ws.text_config) for e in examples]
    prompts = generation_rows(examples[:6], ws.text_config)
    common = dict(batch_size=8, pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.image_fn)
    generating = dict(eos_token_id=ws.tokenizer.eos_token_id, max_new_tokens=4)
    scores, tokens = score_pass(model, rows, **common), generate_pass(model, prompts, **common, **generating)
    run_passes([scores, tokens])
    for a, b in zip(scores.out, score_rows(model, rows, **common), strict=True):
        np.testing.assert_array_equal(a.logps, b.logps)
    for a, b in zip(tokens.out, generate_rows(model, prompts, **common, **generating), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rows_per_batch_under_a_token_cap() -> None:
    """Rows of a batch padded to `length`: the batch size while it fits the cap, else what fits, in whole steps of
    the data-parallel shards and at least one step."""
    from vlmu_jax.eval.batched import BatchCap, rows_per_batch

    cap = BatchCap(tokens=32768)
    assert rows_per_batch(640, 16, cap) == 16  # 10240 positions fit
    assert rows_per_batch(8570, 16, cap) == 3  # 25710 fit, 34280 would not
    assert rows_per_batch(8570, 16, cap, multiple=2) == 2
    assert rows_per_batch(40000, 16, cap, multiple=4) == 4  # never fewer than one row per shard
    assert rows_per_batch(8570, 16, BatchCap()) == 16  # no cap


def test_rows_per_batch_under_an_image_cap() -> None:
    """The image cap counts a row's image inputs: Idefics2 with image splitting gives each image five 980 px crops,
    float32 pixels (3 x 980 x 980 x 4 B) and a boolean mask (980 x 980 B), 62.426 MB; eval.py's few-shot rows show
    up to six images (374.556 MB). The tighter of the two caps wins; 0 is no cap."""
    from vlmu_jax.eval.batched import BatchCap, rows_per_batch

    crops = 5 * (3 * 980 * 980 * 4 + 980 * 980)
    assert crops == 62_426_000
    cap = BatchCap(tokens=32768, image_bytes=2048 * 10**6)
    assert rows_per_batch(640, 16, cap, row_image_bytes=crops) == 16  # 998.816 MB fit
    assert rows_per_batch(640, 64, cap, row_image_bytes=crops) == 32  # 1997.632 MB fit, 2060.058 would not
    assert rows_per_batch(2200, 32, cap, row_image_bytes=crops) == 14  # the token cap: 30800 positions fit
    assert rows_per_batch(640, 16, cap, row_image_bytes=6 * crops) == 5  # 1872.78 MB fit, 2247.336 would not
    assert rows_per_batch(640, 16, cap, multiple=4, row_image_bytes=6 * crops) == 4  # in whole steps of 4
    assert rows_per_batch(640, 16, BatchCap(image_bytes=2048 * 10**6), row_image_bytes=0) == 16  # no image inputs
    assert rows_per_batch(640, 16, BatchCap(tokens=32768), row_image_bytes=6 * crops) == 16  # no image cap


def test_token_cap_splits_long_rows_and_keeps_every_result(workspace: Workspace) -> None:
    """Under a token cap the rows whose batches would exceed it go in smaller batches of their own padded
    length, after the others; every row is scored and generated once, to what the uncapped passes give, and
    compile_ahead compiles the capped shapes too."""
    from vlmu_jax.eval.batched import BatchCap, _eval_source, _SplitSource, compile_ahead
    from vlmu_jax.eval.frozen import frozen

    ws = workspace
    model = ws.load("base")
    rows, prompts = _rows_of_several_lengths(ws, 24)
    common = dict(batch_size=8, pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.image_fn)
    generating = dict(eos_token_id=ws.tokenizer.eos_token_id, max_new_tokens=5)
    uncapped = _eval_source(rows, 8, common["pad_token_id"], ws.image_fn, left_pad=False)
    lengths = sorted({uncapped.padded_length(i) for i in range(len(uncapped))})
    assert len(lengths) >= 2
    cap = 8 * lengths[0]  # batches of the shortest length stay at 8 rows, longer ones get fewer
    capped = _eval_source(rows, 8, common["pad_token_id"], ws.image_fn, left_pad=False, cap=BatchCap(tokens=cap))
    assert isinstance(capped, _SplitSource) and len(capped) > len(uncapped)
    seen = set()
    for i in range(len(capped)):
        idx = capped.global_indices(i)
        assert len(idx) * capped.padded_length(i) <= cap or len(idx) == 1
        assert all(len(rows[j].input_ids) <= capped.padded_length(i) for j in idx)
        seen.update(idx.tolist())
    assert seen == set(range(len(rows)))
    prompt_cap = 3 * _eval_source(prompts, 8, common["pad_token_id"], ws.image_fn, left_pad=True).padded_length(0)
    assert isinstance(_eval_source(prompts, 8, common["pad_token_id"], ws.image_fn, left_pad=True,
                                   cap=BatchCap(tokens=prompt_cap)), _SplitSource)
    want_scores = score_rows(model, rows, **common)
    want_tokens = generate_rows(model, prompts, **common, **generating)
    with frozen(model):
        compile_ahead(model, to_score=[rows], **common, **generating, cap=BatchCap(tokens=cap))
        compile_ahead(model, to_generate=[prompts], **common, **generating, cap=BatchCap(tokens=prompt_cap))()
        COUNTER.active, COUNTER.count = True, 0
        scores = score_rows(model, rows, **common, cap=BatchCap(tokens=cap))
        tokens = generate_rows(model, prompts, **common, **generating, cap=BatchCap(tokens=prompt_cap))
        COUNTER.active = False
    assert COUNTER.count == 0, f"{COUNTER.count} compilations after compile_ahead"
    for a, b in zip(scores, want_scores, strict=True):
        np.testing.assert_allclose(a.logps, b.logps, rtol=1e-5, atol=1e-5)
    for a, b in zip(tokens, want_tokens, strict=True):
        np.testing.assert_array_equal(a, b)


def test_image_cap_batches_rows_of_many_images_apart(workspace: Workspace) -> None:
    """Under an image cap, rows that show three images (eval.py's few-shot rows) go in batches of their own, as
    many as the cap holds, after the one-image rows, which stay at the batch size; each batch's image inputs, as
    collated, fit the cap, every row is batched, and its scores are the uncapped pass's."""
    from vlmu_jax.eval.batched import BatchCap, _eval_source, _SplitSource

    ws = workspace
    examples = examples_from(ws.bench.identities)[:12]
    markup = ws.text_config.template.image_markup  # the prompt shows each context image where its markup is
    shots = [dataclasses.replace(e, question=2 * markup + e.question, context_images=(e.image, e.image))
             for e in examples[:6]]
    rows = [encode(e, ws.text_config) for e in examples + shots]
    assert {len(r.images) for r in rows} == {1, 3}
    slot = sum(a.nbytes for a in ws.image_fn(None).values())
    cap = BatchCap(image_bytes=8 * slot)  # eight image slots: 8 one-image rows, 2 three-image rows
    source = _eval_source(rows, 8, ws.tokenizer.pad_token_id, ws.image_fn, left_pad=False, cap=cap)
    assert isinstance(source, _SplitSource)
    sizes, seen = [], []
    for i in range(len(source)):
        idx = source.global_indices(i)
        images = {len(rows[j].images) for j in idx}
        batch = source.get(i)
        assert sum(a.nbytes for a in batch["images"].values()) <= cap.image_bytes
        sizes.append((images.pop() if len(images) == 1 else images, len(idx)))
        seen += idx.tolist()
    assert set(seen) == set(range(len(rows)))  # (a part's last batch is filled up with its first rows again)
    assert sizes == [(1, 8), (1, 8), (3, 2), (3, 2), (3, 2)]  # 12 one-image rows at 8, then 6 three-image ones at 2
    # every row's scores are the uncapped pass's
    model = ws.load("base")
    common = dict(batch_size=8, pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.image_fn)
    for a, b in zip(score_rows(model, rows, **common, cap=cap), score_rows(model, rows, **common), strict=True):
        np.testing.assert_allclose(a.logps, b.logps, rtol=0, atol=1e-5)



def test_eval_stage_tokenises_fiubench_rows_once_for_every_model(workspace: Workspace, monkeypatch) -> None:
    """The eval stage makes FIUBench's rows and prompts (`fiubench.prepare`) once, in a thread of its own, and
    evaluates every model on them: two models here, each with its full logs."""
    from vlmu_jax import stages
    from vlmu_jax.eval.tasks import fiubench

    config = workspace.config.copy_and_resolve_references()  # the module's workspace keeps its own config
    base = workspace.base_model
    config.eval.models, config.eval.reference_model = f"a={base},b={base}", ""
    ws = Workspace(config, workspace.workdir)
    made, prepare = [], fiubench.prepare

    def counted(*args, **kwargs):
        made.append(threading.current_thread().name)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(fiubench, "prepare", counted)
    stages.eval(ws)
    assert len(made) == 1 and made[0].startswith("eval-inputs"), made
    for name in ("a", "b"):
        logs = json.loads((ws.workdir / "eval_results" / name / "eval_log_aggregated.json").read_text())
        assert len(logs["eval_forget_log.json"]["avg_gt_loss"]) > 0, name


def test_eval_stage_compiles_the_first_models_programs_on_its_stand_in(workspace: Workspace, monkeypatch) -> None:
    """The eval stage compiles its first model's programs on a stand-in (shapes and placements, per-layer copies
    and image features included) while the model loads: here the load waits until the stand-in's compiles are
    done, and then the model's own evaluation compiles none of the programs the stand-in compiled, its layer
    copies' slicing included (FIUBench; MLLMU-Bench in test_mllmu_eval.py)."""
    ws = Workspace(stand_in_config(workspace.config, str(workspace.base_model), 24), workspace.workdir)
    ahead, after = compiles_around_the_first_load(ws, monkeypatch)
    assert {"jit(prefill)", "jit(_continuations_over_cache)", "jit(_decode)", "jit(unstack)"} <= ahead
    assert not [name for name in after if name in ahead], after
    logs = json.loads((ws.workdir / "eval_results" / "standin" / "eval_log_aggregated.json").read_text())
    assert len(logs["eval_forget_log.json"]["generated_text"]) > 0
