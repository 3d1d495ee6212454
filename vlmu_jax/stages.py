"""One function per pipeline stage; each reads the workspace, does its work and marks its folder done.

finetune:  base -> models/finetuned (all identities) and models/retain_model (identities outside the
           forget split: the reference of the KS-test forget quality), full or LoRA finetuning.
unlearn:   models/finetuned + LoRA trained with each configured objective -> models/unlearned_<objective>.
eval:      every model above scored on the forget and retain splits -> eval_results/<model>/.
export:    each unlearned model -> export/unlearned_<objective> (HF folder, LoRA merged, export dtype).
report:    eval_results -> aggregate CSV and plots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from vlmu_jax import model_sources
from vlmu_jax.data import stream_length
from vlmu_jax.data.batching import (
    IGNORE,
    Encoded,
    ExampleSource,
    bucket_length,
    encode_all,
    examples_from,
    label_slots,
    row_buckets,
)
from vlmu_jax.data.records import Identity
from vlmu_jax.errors import InputError
from vlmu_jax.eval.frozen import frozen
from vlmu_jax.eval.layer_copies import layer_copies, room_for
from vlmu_jax.eval.scoring import head_kl, head_logprobs, head_token_stat
from vlmu_jax.logs import say, timed
from vlmu_jax.models import lora
from vlmu_jax.models.registry import set_options
from vlmu_jax.models.sharding import batch_shards
from vlmu_jax.pipeline import (
    Workspace,
    clear_done,
    is_done,
    is_written_or_writing,
    mark_done,
    write_in_background,
)
from vlmu_jax.protocol import Protocol
from vlmu_jax.unlearn.objectives import get_objective
from vlmu_jax.unlearn.trainer import TrainConfig, train

_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "preprocessor_config.json", "chat_template.jinja", "generation_config.json")


def _predicting(hidden: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(hidden states [B, N, D], their next tokens [B, N], mask [B, N]) at the positions the objectives score: the
    batch's label positions where it holds them (`batching.label_index`; the output head then runs on those
    alone), else every position but the last, masked to the labels."""
    ids, predicted = batch["input_ids"], batch["labels"][:, 1:] != IGNORE
    if "label_index" not in batch:
        return hidden[:, :-1], ids[:, 1:], predicted
    at = batch["label_index"]
    count = jnp.sum(predicted, axis=1)
    return (jnp.take_along_axis(hidden, at[..., None], axis=1), jnp.take_along_axis(ids, at + 1, axis=1),
            jnp.arange(at.shape[1]) < count[:, None])


def logps_fn(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Answer-token log-probs of a batch and their mask, for the trainer's objectives (`_predicting`'s
    positions)."""
    hidden, targets, mask = _predicting(model(batch["input_ids"], batch["attention_mask"], batch["images"]), batch)
    return head_logprobs(hidden, model.head_weight(), targets), mask


def kl_fn(model: nnx.Module, ref_model: nnx.Module, batch: dict, *,
          all_positions: bool = False) -> tuple[jax.Array, jax.Array]:
    """Full-vocabulary KL(reference || model) at every real token of the batch that predicts a next one; with
    `all_positions` (FIUBench forget.py) at every position up to the step's longest row (`step_length`, set by the
    trainer; else this batch's longest), padding and the last token included. The batch must be padded at least
    that far: stages.unlearn gives all streams one bucket then."""
    args = (batch["input_ids"], batch["attention_mask"], batch["images"])
    hidden, ref_hidden = model(*args), jax.lax.stop_gradient(ref_model(*args))
    if not all_positions:
        hidden, ref_hidden = hidden[:, :-1], ref_hidden[:, :-1]
    kl = head_kl(hidden, ref_hidden, model.head_weight(), jax.lax.stop_gradient(ref_model.head_weight()))
    if not all_positions:
        return kl, batch["attention_mask"][:, 1:] > 0
    length = batch.get("step_length", jnp.max(jnp.sum(batch["attention_mask"], axis=1)))
    return kl, jnp.broadcast_to(jnp.arange(kl.shape[1]) < length, kl.shape)


def objective_config(ws: Workspace, cfg: TrainConfig) -> TrainConfig:
    """The protocol's objective reductions: MLLMU-Bench's NPO compares batch-mean losses."""
    return dataclasses.replace(cfg, npo_batch_mean=True) if ws.protocol.mllmu_baselines else cfg


# find_all_linear_names collects names outside HF modules named *multi_modal_projector* / *vision_model*: our
# vision_tower always, our multi_modal_projector for LLaVA only (Idefics2's is HF's `connector`, which it keeps).
_PEFT_SKIPPED = {"llava": ("vision_tower", "multi_modal_projector"), "idefics2": ("vision_tower",)}


def lora_targets(model: nnx.Module, protocol: Protocol) -> str:
    """The protocol's LoRA targets regex; MLLMU-Bench's original protocol: its PEFT suffix rule on this model."""
    if not protocol.mllmu_peft_lora:
        return protocol.lora_targets
    skip = _PEFT_SKIPPED.get(model.config.hf_config.get("model_type", ""), ("vision_tower", "multi_modal_projector"))
    return lora.suffix_targets(model, skip=skip)


def vocab_fn(model: nnx.Module, ref_model: nnx.Module | None, batch: dict, stat) -> jax.Array:
    """An objective's per-position statistic of the full next-token distributions (UNDIAL, CE-U), chunked, at
    `logps_fn`'s positions."""
    args = (batch["input_ids"], batch["attention_mask"], batch["images"])
    ref_hidden = ref_head = None
    if ref_model is not None:
        ref_hidden = jax.lax.stop_gradient(_predicting(ref_model(*args), batch)[0])
        ref_head = jax.lax.stop_gradient(ref_model.head_weight())
    hidden, targets, _ = _predicting(model(*args), batch)
    return head_token_stat(stat, hidden, model.head_weight(), targets, ref_hidden, ref_head)


def hidden_fn(model: nnx.Module, batch: dict, layer: int) -> tuple[jax.Array, jax.Array]:
    """Decoder layer `layer`'s output [B, T, D] (only layers 0..layer run) and the answer mask [B, T] (RMU)."""
    hidden = model(batch["input_ids"], batch["attention_mask"], batch["images"], output_layer=layer)
    return hidden, batch["labels"] != IGNORE


def _rows(ws: Workspace, identities: list[Identity], *, seed: int, idk: tuple[str, ...] = (),
          text_only: bool = False) -> list[Encoded]:
    examples = examples_from(identities, idk=idk, seed=seed)
    if text_only:  # the same questions without the identity's image (MMUnlearner's textual knowledge)
        examples = [dataclasses.replace(e, image=None) for e in examples]
    rows = encode_all(examples, ws.text_config)
    if not rows:
        raise InputError("a training stream has no examples: check the split names and the data folder")
    return rows


def _source(ws: Workspace, name: str, rows: list[Encoded], stage: ml_collections.ConfigDict, *, seed: int,
            shuffle: bool = True, buckets: tuple[int, ...] | None = None, slots: int | None = None) -> ExampleSource:
    """A training stream; without given `buckets`, padded to one length when `data.single_length_max_padding`
    allows it (`vlmu_jax.data.stream_length`). Its batches hold their label positions in `slots` slots (default:
    `batching.label_slots` of its rows' labels; a stage with several streams gives them all their most)."""
    shards = batch_shards(ws.mesh)
    if stage.batch_size % shards:
        raise InputError(f"batch_size {stage.batch_size} does not split over the mesh's {shards} data-parallel "
                         f"shards (mesh {dict(ws.mesh.shape)}): use a multiple of {shards}")
    source = functools.partial(ExampleSource, rows, global_batch_size=stage.batch_size,
                               pad_token_id=ws.tokenizer.pad_token_id, image_fn=ws.image_fn, seed=seed,
                               shuffle=shuffle, label_slots=slots or label_slots(r.labels for r in rows))
    if buckets is not None:
        return source(buckets=buckets)
    per_bucket, max_padding = source(), ws.config.data.single_length_max_padding
    lengths = stream_length.plan(per_bucket)
    say(lengths.summary(name, max_padding))
    single = lengths.single(max_padding)
    return per_bucket if single is None else source(buckets=(single,))


def _prepare_trainable(model: nnx.Module, stage: ml_collections.ConfigDict, seed: int, protocol: Protocol):
    """Adds LoRA when asked (on the stage's targets, else the protocol's) and returns the NNX filter of what
    trains."""
    use_lora = stage.lora_rank > 0
    if use_lora:
        lora.apply_lora(model, rank=stage.lora_rank, alpha=stage.lora_alpha, dropout=stage.lora_dropout,
                        targets=stage.lora_targets or lora_targets(model, protocol), seed=seed,
                        init="gaussian" if protocol.mllmu_peft_lora else "kaiming")
    return lora.trainable_filter(lora=use_lora, tune_vision_tower=stage.tune_vision_tower,
                                 tune_mm_projector=stage.tune_mm_projector,
                                 tune_language_model=stage.tune_language_model)


def _save_model(ws: Workspace, model: nnx.Module, out: Path, dtype=None, info: dict | None = None) -> None:
    """Merged HF folder plus the base checkpoint's tokenizer and processor files (and `export_info.json`: `info`
    with the source tree's commit, when given)."""
    from vlmu_jax.checkpoints.hf_export import export_hf

    lora.merge_lora(model)
    clear_done(out)
    export_hf(model, out, dtype=dtype)
    _finish_folder(ws, out, dtype, info)


def _finish_folder(ws: Workspace, out: Path, dtype=None, info: dict | None = None) -> None:
    """The side files next to a written model, then its DONE marker."""
    from vlmu_jax import provenance

    if jax.process_index() == 0:
        for name in _SIDE_FILES:
            if (ws.base_model / name).exists():
                shutil.copy2(ws.base_model / name, out / name)
        if info is not None:
            commit = provenance.git_commit(Path(__file__).resolve().parent.parent)
            record = {**info, "commit": commit, "dtype": str(dtype) if dtype is not None else None}
            (out / "export_info.json").write_text(json.dumps(record, indent=2))
    mark_done(out)


def _keep_trained(ws: Workspace, model: nnx.Module, out: Path) -> None:
    """A trained model's HF folder, and the model held in host memory for the next stages (no reload).

    Why in the background: at 7B writing the folder took 20-25 s per model (bench/RESULTS.md, session 4), and no
    later stage of this process reads it: they take the held copy. So the folder is written from that copy by a
    thread while the run goes on (one process only: on several, a param's gather is collective). A stage that
    needs the folder itself waits for it (`pipeline.is_done`, `Workspace.load`); the run waits for it at the end.
    """
    from vlmu_jax.checkpoints.hf_export import export_held

    lora.merge_lora(model)
    if not ws.models.capacity or jax.process_count() > 1:
        with timed(f"HF folder {out}"):
            _save_model(ws, model, out)
        ws.models.put(out, model)
        return
    clear_done(out)
    ws.models.put(out, model)
    config, params = ws.models.held(out)

    def write() -> None:
        with timed(f"HF folder {out} (written beside the run)"):
            export_held(out, config, params)
            _finish_folder(ws, out)

    write_in_background(out, write)


def _train_model(ws: Workspace, *, start: str, out_name: str, stage: ml_collections.ConfigDict,
                 sources: dict[str, ExampleSource], features: dict, objective: str | None = None,
                 reference: str | None = None) -> None:
    """Trains model folder ``start`` into ``out_name``; ``reference`` names the reference model's folder when it is
    not ``start`` with LoRA off. ``features``: the stage call's image features made from ``start``, shared by its
    models (`_with_image_features`)."""
    out = ws.model_dir(out_name)
    if is_done(out) and not ws.config.force:
        logging.info("%s exists, skipping (config.force=True redoes it)", out)
        return
    model = ws.load(start)
    if stage.remat and stage.remat != model.config.remat:
        set_options(model, remat=stage.remat)
        logging.info("%s trains with remat %r (config.model.remat %r)", out_name, stage.remat, ws.config.model.remat)
    trainable = _prepare_trainable(model, stage, ws.config.seed, ws.protocol)
    ref_model = None
    if reference is not None:
        _require(ws.model_dir(reference), f"{out_name} compares against it: run the finetune stage first")
        ref_model = ws.load(reference)
        _prepare_trainable(ref_model, stage, ws.config.seed, ws.protocol)  # the same graph; zero adapters
    sources = _with_image_features(ws, model, ref_model, trainable, stage, sources, out_name, features)
    run_dir = ws.workdir / "train" / out_name
    if ws.config.force:
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg = objective_config(ws, TrainConfig.from_config(stage))
    if objective is not None:
        cfg = dataclasses.replace(cfg, objective=objective)
    kl = functools.partial(kl_fn, all_positions=ws.protocol.fiubench_kl_all_positions or ws.protocol.mllmu_baselines)
    result = train(model, cfg, sources=sources, logps_fn=logps_fn, kl_fn=kl, vocab_fn=vocab_fn,
                   hidden_fn=hidden_fn, workdir=run_dir, trainable=trainable, mesh=ws.mesh, reference=ref_model)
    logging.info("%s: %d steps, last loss %.4f", out_name, result.step, result.losses[-1] if result.losses
                 else float("nan"))
    _keep_trained(ws, model, out)


def _with_image_features(ws: Workspace, model: nnx.Module, ref_model: nnx.Module | None, trainable,
                         stage: ml_collections.ConfigDict, sources: dict[str, ExampleSource], name: str,
                         made: dict) -> dict[str, ExampleSource]:
    """`sources` whose batches carry each image made once for the stage into what the model reads past its frozen
    part (vlmu_jax/image_embeddings.py, config <stage>.image_embeddings_mb): its features where neither the vision
    tower nor the projector trains, the tower's states where only the projector does. That holds where the
    reference model (if any) makes the same values and the stage's steps show at least as many rows as there are
    images; else `sources` as they are. `made` holds what an earlier model of the same start folder made (the
    unlearning methods of one stage), taken when it covers these images, else replaced."""
    from vlmu_jax.image_embeddings import cut_name, same_image_path, stage_image_fn, training_cut

    cut = training_cut(model, trainable)
    # one process only: with several, each host makes its own rows' batches, and the image program needs them all
    if stage.image_embeddings_mb <= 0 or jax.process_count() > 1 or cut is None or (
            ref_model is not None and not same_image_path(model, ref_model, cut)):
        return sources
    refs = list(dict.fromkeys(ref for source in sources.values() for row in source.rows for ref in row.images))
    if 0 < stage.num_steps * stage.batch_size * len(sources) < len(refs):
        return sources  # fewer steps than an epoch: its rows show fewer images than making each one would take
    budget = stage.image_embeddings_mb * 10**6
    what = cut_name(cut)
    if made.get("budget") == budget and made.get("cut") == cut and made["refs"].issuperset(refs):
        image_fn, size = made["image_fn"], made["bytes"]
    else:
        with timed(f"{name}: {what} of its {len(refs)} images"):
            image_fn, size = stage_image_fn(model, ws.image_fn, refs, budget, ws.mesh, stage.batch_size, cut)
        made.update(budget=budget, cut=cut, refs=set(refs), image_fn=image_fn, bytes=size)
    if image_fn is None:
        say(f"{name}: its images' {what} take {size / 1e6:,.1f} MB, over the stage's image_embeddings_mb "
            f"({stage.image_embeddings_mb:,}): the vision tower runs in every step")
        return sources
    say(f"{name}: each image's {what} made once for the stage ({size / 1e6:,.1f} MB of host memory); its steps "
        "leave the vision tower out")
    return {key: source.with_image_fn(image_fn) for key, source in sources.items()}


def finetune(ws: Workspace) -> None:
    """The vanilla model (all identities) and its retain-only twin (the forget-quality reference)."""
    c, bench, shuffle = ws.config, ws.bench, not ws.protocol.fiubench_file_order
    everyone = list(bench.identities)
    if ws.protocol.fiubench_reference_on_retain_split:
        retained = bench.split("retain")
    else:
        forget = set(bench.splits[_forget_split(ws)])
        retained = [i for i in everyone if i.uid not in forget]
    features: dict = {}  # both start from the base model: one set of image features serves both
    _train_model(ws, start="base", out_name="finetuned", stage=c.finetune, features=features,
                 sources={"train": _source(ws, "finetuned", _rows(ws, everyone, seed=c.seed), c.finetune,
                                           seed=c.seed, shuffle=shuffle)})
    _train_model(ws, start="base", out_name="retain_model", stage=c.retain_model, features=features,
                 sources={"train": _source(ws, "retain_model", _rows(ws, retained, seed=c.seed), c.retain_model,
                                           seed=c.seed, shuffle=shuffle)})


def _forget_split(ws: Workspace) -> str:
    if ws.config.benchmark == "fiubench":
        return ws.config.data.forget_split
    return f"forget_{ws.config.data.forget_ratio}"


def _retain_split(ws: Workspace) -> str:
    if ws.config.benchmark == "fiubench":
        return "retain"
    return f"retain_{100 - ws.config.data.forget_ratio}"


def unlearn(ws: Workspace) -> None:
    """LoRA unlearning of the forget split with the configured objective and data streams."""
    _require(ws.model_dir("finetuned"), "the unlearn stage starts from it: run the finetune stage first")
    c, bench, shuffle = ws.config, ws.bench, not ws.protocol.fiubench_file_order
    forget, retain = bench.split(_forget_split(ws)), bench.split(_retain_split(ws))
    seeds = {"forget": c.seed, "retain": c.seed + 1, "idk": c.seed, "forget_text": c.seed}
    rows = {"forget": _rows(ws, forget, seed=seeds["forget"]), "retain": _rows(ws, retain, seed=seeds["retain"])}
    if bench.idk:
        rows["idk"] = _rows(ws, forget, seed=seeds["idk"], idk=bench.idk)
    if any(get_objective(o).preserve_streams for o in objectives(ws)):
        rows["forget_text"] = _rows(ws, forget, seed=seeds["forget_text"], text_only=True)
    # forget.py's collator pads a step's forget and retain rows to one length and its KL term counts those padding
    # positions: then every stream gets the one bucket its longest row needs (see kl_fn).
    buckets = None
    if ws.protocol.fiubench_kl_all_positions:
        every = [r for rs in rows.values() for r in rs]
        buckets = (bucket_length(max(len(r.input_ids) for r in every), row_buckets(every)),)
    slots = label_slots(r.labels for rs in rows.values() for r in rs)  # one count: a bucket's streams join
    sources = {name: _source(ws, f"unlearn {name}", rs, c.unlearn, seed=seeds[name],
                             shuffle=shuffle or name == "retain", buckets=buckets, slots=slots)
               for name, rs in rows.items()}
    features: dict = {}  # every method starts from the finetuned model: its image features are made once
    for objective in objectives(ws):
        _train_model(ws, start="finetuned", out_name=f"unlearned_{objective}", stage=c.unlearn,
                     objective=objective, features=features, **_mllmu_npo(ws, objective, sources))


def _mllmu_npo(ws: Workspace, objective: str, sources: dict[str, ExampleSource]) -> dict:
    """MLLMU-Bench's NPO.py (protocol original): no retain term, and the reference is the oracle model, trained
    on the retain split from the base model (reference_model_FT.py): our retain_model."""
    if objective == "npo" and ws.protocol.mllmu_baselines:
        return {"sources": {k: v for k, v in sources.items() if k != "retain"}, "reference": "retain_model"}
    return {"sources": sources}


def objectives(ws: Workspace) -> list[str]:
    """`unlearn.objective` may name several methods ("gd,ga,npo"): one unlearned model each."""
    return [o.strip() for o in ws.config.unlearn.objective.split(",") if o.strip()]


def eval_models(ws: Workspace) -> list[str]:
    return ["finetuned", "retain_model", *(f"unlearned_{o}" for o in objectives(ws))]


def eval_sources(ws: Workspace) -> dict[str, Path]:
    """Name -> folder of every model the eval and report stages cover (`vlmu_jax.model_sources`)."""
    return model_sources.eval_sources({n: ws.model_dir(n) for n in eval_models(ws)}, ws.config.eval)


def _require(folder: Path, why: str) -> None:
    """A stage input from an earlier stage must be finished (its DONE marker), not just present."""
    if not is_done(folder):
        raise InputError(f"missing or unfinished (no {folder.name}/DONE): {why}", file=folder)


def export(ws: Workspace) -> None:
    """Hugging Face folders of the unlearned models (LoRA merged) in the configured dtype, each with
    ``export_info.json`` (source, step, commit).

    ``export.from_checkpoint``: "" exports ``models/unlearned_<method>`` to ``export/unlearned_<method>``;
    "latest" or a step exports that Orbax checkpoint of ``train/unlearned_<method>`` (also of an interrupted run)
    to ``export/unlearned_<method>_step<N>``.
    """
    from vlmu_jax.checkpoints.orbax_io import checkpoint_steps

    dtype = jnp.dtype(ws.config.export.dtype) if ws.config.export.dtype else None
    source = ws.config.export.from_checkpoint
    for objective in objectives(ws):
        name = f"unlearned_{objective}"
        ckpt_dir = ws.workdir / "train" / name / "checkpoints"
        if not source:
            out = ws.workdir / "export" / name
            if not (is_done(out) and not ws.config.force):
                _require(ws.model_dir(name), "export writes the unlearned models: run the unlearn stage first (or "
                                             "export an Orbax checkpoint with --config.export.from_checkpoint)")
                steps = checkpoint_steps(ckpt_dir)
                _save_model(ws, ws.load(name), out, dtype=dtype,
                            info={"source": str(ws.model_dir(name)), "step": steps[-1] if steps else None})
            continue
        step = _pick_step(ckpt_dir, source)
        out = ws.workdir / "export" / f"{name}_step{step}"
        if not (is_done(out) and not ws.config.force):
            model = _model_at_checkpoint(ws, ckpt_dir, step, start="finetuned", stage=ws.config.unlearn)
            _save_model(ws, model, out, dtype=dtype, info={"source": str(ckpt_dir / str(step)), "step": step})


def _pick_step(ckpt_dir: Path, source: str) -> int:
    """The checkpoint step `export.from_checkpoint` names ("latest" or a number) among those on disk."""
    from vlmu_jax.checkpoints.orbax_io import checkpoint_steps

    steps = checkpoint_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no Orbax checkpoint in {ckpt_dir}: run the unlearn stage (it checkpoints every "
                                "unlearn.save_every steps) or leave export.from_checkpoint empty")
    step = steps[-1] if source == "latest" else int(source)
    if step not in steps:
        raise ValueError(f"export.from_checkpoint={source}: {ckpt_dir} has steps {steps} (unlearn.keep_checkpoints "
                         "keeps only the newest)")
    return step


def _model_at_checkpoint(ws: Workspace, ckpt_dir: Path, step: int, *, start: str,
                         stage: ml_collections.ConfigDict) -> nnx.Module:
    """The run's starting model with its trainable parameters (LoRA included) read from checkpoint `step`."""
    from vlmu_jax.checkpoints.orbax_io import restore_part

    if not is_done(ws.model_dir(start)):
        raise FileNotFoundError(f"{ws.model_dir(start)} is missing: the checkpoint holds only the trained "
                                f"parameters, the rest comes from the {start} model")
    model = ws.load(start)
    trainable = _prepare_trainable(model, stage, ws.config.seed, ws.protocol)
    params = nnx.state(model, trainable)
    nnx.update(model, restore_part(ckpt_dir, step, params, index=0))  # the trainer saves (params, opt, rng)
    return model


def _runner(ws: Workspace):
    from vlmu_jax.eval.batched import BatchCap
    from vlmu_jax.eval.tasks.fiubench import Runner

    return Runner(text=ws.eval_text_config, batch_size=ws.config.eval.batch_size, image_fn=ws.eval_image_fn,
                  max_new_tokens=ws.config.eval.max_new_tokens, protocol=ws.protocol, mesh=ws.mesh,
                  shared_prompts=ws.config.eval.shared_prompts,
                  cap=BatchCap(ws.config.eval.max_batch_tokens, ws.config.eval.max_batch_image_mb * 10**6))


def _embedding_runner(ws: Workspace, model: nnx.Module, name: str | None, runner):
    """`runner` with batches that carry each image's features, made once per image for this model
    (vlmu_jax/image_embeddings.py, config eval.image_embeddings_mb), where that applies; else `runner` itself.
    Says so under the model's `name` (None: a stand-in's, says nothing)."""
    from vlmu_jax.image_embeddings import embedded_image_fn

    image_fn = embedded_image_fn(model, runner.image_fn, ws.config.eval.image_embeddings_mb * 10**6, ws.mesh)
    if image_fn is None:
        return runner
    if name is not None:
        say(f"eval {name}: each image's features computed once and reused by every row that shows it")
    return dataclasses.replace(runner, image_fn=image_fn)


def eval(ws: Workspace) -> None:  # noqa: A001 - the stage is called eval in configs
    """Per-question logs of every trained model: FIUBench forget/retain/APE, or MLLMU-Bench's four sets; the
    judge's scores when one is configured; MME / POPE (``mme.json`` with the eval tool's per-category files in
    ``mme_eval_tool/``, ``pope.json``) when their paths are set."""
    sources = _evaluable(ws)  # given checkpoints are checked before any model runs
    base_runner = _runner(ws)
    utility = _utility_inputs(ws)  # read and checked before any model runs
    todo = {name: path for name, path in sources.items()
            if ws.config.force or not _evaluated(ws.workdir / "eval_results" / name, path)}
    if not todo:
        return
    with ThreadPoolExecutor(2, thread_name_prefix="eval-inputs") as pool:
        # tokenised once for every model, while the first one loads (host work the devices would wait for)
        inputs = pool.submit(_eval_inputs, ws, base_runner)
        # and beside it, the first model's stand-in made; once both are, its programs compile, while it loads
        ahead = pool.submit(_compile_on_stand_in, ws, next(iter(todo.values())), base_runner, inputs) \
            if ws.config.eval.compile_ahead else None
        _evaluate_each(ws, todo, base_runner, utility, inputs)
        if ahead is not None:
            ahead.result()  # its errors


def _compile_on_stand_in(ws: Workspace, path: Path, base_runner, inputs: Future) -> None:
    """Compiles the eval programs of the model at `path` on a stand-in of it: its shapes and placements, with the
    per-layer copies and image features it will be evaluated with (nothing read, nothing run). The model's own
    compile-ahead, once it is loaded, finds each program compiled or waits for its compile (eval/frozen.py).
    Why: the first model's programs compiled only once it was loaded, so the devices sat idle for the load and
    then for the compile: Llama-3.2-11B-Vision's first pass started 16.8 s into the stage, 4.9 s after its load
    (bench/RESULTS.md session 37)."""
    from vlmu_jax.eval.tasks import fiubench, mllmu

    compile_programs = fiubench.compile_programs if ws.config.benchmark == "fiubench" else mllmu.compile_programs
    model = ws.load_shapes(path)
    with layer_copies(model, ws.config.eval.layer_copies, restore=False), frozen(model):
        compile_programs(model, inputs.result(), _embedding_runner(ws, model, None, base_runner))()


def _evaluate_each(ws: Workspace, todo: dict[str, Path], base_runner, utility: dict, inputs: Future) -> None:
    """The eval stage's loop: each model in `todo` loaded (the next one ahead where it fits), evaluated, its results
    written. `inputs`: a Future of the benchmark's tokenised rows (`_eval_inputs`)."""
    from vlmu_jax.eval.tasks.mme import write_eval_tool_results
    from vlmu_jax.report.aggregate import write_json

    judge = None
    loads = _loaded_ahead(ws, list(todo.values()))
    for name, path in todo.items():
        out = ws.workdir / "eval_results" / name
        clear_done(out)
        with timed(f"eval {name}: model loaded"):
            model = next(loads)
        judge = judge or _judge(ws)
        # restore=False: the model is its own (loaded or built from held params) and unused after this block
        with layer_copies(model, ws.config.eval.layer_copies, restore=False) as copied, \
                frozen(model, compile_ahead=ws.config.eval.compile_ahead):
            if copied:
                say(f"eval {name}: decoder weights copied per layer for evaluation, in place of the stack (no "
                    "per-layer copy per forward)")
            runner = _embedding_runner(ws, model, name, base_runner)
            logs = _fiubench_logs(ws, model, runner, inputs.result(), name, judge) \
                if ws.config.benchmark == "fiubench" else _mllmu_logs(ws, model, runner, inputs.result(), judge)
            logs.update(_utility_logs(model, runner, utility, name))
        if jax.process_index() == 0:
            for file, log in logs.items():
                write_json(log, out / file)
            if "mme.json" in logs:  # MME's own eval_tool (calculation.py) scores this folder as eval_mme.py's
                write_eval_tool_results(utility["mme"], [p["prediction"] for p in logs["mme.json"]["predictions"]],
                                        out / "mme_eval_tool")
            write_json({"model": str(path.resolve())}, out / _EVAL_INFO)
        mark_done(out)


_EVAL_INFO = "eval_info.json"  # the folder a model's results were computed from


def _loaded_ahead(ws: Workspace, paths: list[Path]) -> Iterator[nnx.Module]:
    """The eval stage's models in order, each loaded while the one before it is evaluated (config
    eval.load_ahead). Why: the devices sat idle while each 7B model loaded from its folder, ~3 s of every
    model's evaluation at FIUBench's splits (bench/RESULTS.md). Only with one process (a load runs jitted casts on
    the devices, which several processes must issue in the same order) and, under auto, when the first local
    device has room for two more of the model: the next one, and the evaluation's copies, caches and
    activations."""
    mode = ws.config.eval.load_ahead
    with ThreadPoolExecutor(1, thread_name_prefix="load-ahead") as pool:
        ahead = None
        for i, path in enumerate(paths):
            model = ahead.result() if ahead is not None else ws.load(path)
            ahead = None
            if i + 1 < len(paths) and jax.process_count() == 1 and (
                    mode == "always" or (mode == "auto" and room_for(model, 3))):
                say(f"eval: loading {paths[i + 1]} while the model before it is evaluated")
                ahead = pool.submit(ws.load, paths[i + 1])
            yield model


def _evaluated(out: Path, path: Path) -> bool:
    """Results in `out` are finished and come from `path` (results of another checkpoint under the same name are
    redone); results from before eval_info.json existed count as the run's own model's."""
    if not is_done(out):
        return False
    info = out / _EVAL_INFO
    recorded = json.loads(info.read_text())["model"] if info.exists() else str(path.resolve())
    return recorded == str(path.resolve())


def _evaluable(ws: Workspace) -> dict[str, Path]:
    """The models the eval stage can run now: every given checkpoint (checked in full, and against the tokenizer's
    model type) and the run's finished ones. Says which of the run's own are missing; fails when none is left."""
    from vlmu_jax.checkpoints.hf_import import check_checkpoint, read_hf_config

    given = model_sources.given_checkpoints(ws.config.eval)
    for name, path in given.items():
        check_checkpoint(path)
        model_type, base_type = read_hf_config(path)["model_type"], ws.hf_config["model_type"]
        if model_type != base_type:
            raise InputError(f"{model_type!r}, but the tokenizer and processor come from {ws.base_model} "
                             f"({base_type!r}): set config.model.path to {name}'s base model",
                             file=path / "config.json", field="model_type")
    sources = eval_sources(ws)
    ready = {n: p for n, p in sources.items() if n in given or is_written_or_writing(p)}
    missing = [str(p) for n, p in sources.items() if n not in ready]
    if not ready:
        raise InputError(f"stage eval: nothing to evaluate: {', '.join(missing)} not trained (no DONE marker); run "
                         "the finetune / unlearn stages first, or name checkpoints with "
                         "--config.eval.models=NAME=PATH,... and --config.eval.reference_model=PATH")
    if missing:
        say(f"eval: skipping {', '.join(missing)} (not trained in this workdir)")
    return ready


def _judge(ws: Workspace):
    """(client, prompt) of the configured judge, or None. The HTTP judge runs on process 0 only; the local one
    on every process (its generation is sharded like the model's), with process 0 writing the cache."""
    from vlmu_jax.eval import judge

    c = ws.config.eval
    local = c.judge_backend == "local"
    if not local and not (c.judge_base_url and jax.process_index() == 0):
        return None
    prompt = judge.load_prompt(ws.config.benchmark, c.judge_prompt_file, c.judge_system_file)
    max_tokens = c.judge_max_tokens or (judge.FIUBENCH_MAX_TOKENS if ws.config.benchmark == "fiubench"
                                        else judge.MLLMU_MAX_TOKENS)
    cache = str(ws.workdir / "judge_cache.json")
    if not local:
        return judge.JudgeClient(c.judge_base_url, c.judge_model, api_key_env=c.judge_api_key_env, cache_path=cache,
                                 max_tokens=max_tokens), prompt
    from vlmu_jax.eval.local_judge import local_judge

    m = ws.config.model
    client = local_judge(c.judge_model_path, template=c.judge_template or m.template, batch_size=c.batch_size,
                         max_tokens=max_tokens, cache_path=cache, model_name=c.judge_model,
                         write_cache=jax.process_index() == 0, dtype=m.dtype, mesh=ws.mesh, remat=m.remat,
                         scan_layers=m.scan_layers, attention_impl=m.attention)
    return client, prompt


def _utility_inputs(ws: Workspace) -> dict:
    from vlmu_jax.eval.tasks import utility

    c, out = ws.config.eval, {}
    if c.mme_root:
        out["mme"] = utility.read_mme_checked(c.mme_root)
    if c.pope_path:
        out["pope"] = utility.read_pope_checked(c.pope_path, c.pope_image_root or None)
    return out


def _utility_logs(model: nnx.Module, runner, inputs: dict, name: str) -> dict[str, dict]:
    from vlmu_jax.eval.tasks import utility

    logs = {}
    if "mme" in inputs:
        logs["mme.json"] = utility.evaluate_mme(model, inputs["mme"], runner, desc=name)
    if "pope" in inputs:
        logs["pope.json"] = utility.evaluate_pope(model, inputs["pope"], runner, desc=name)
    return logs


def _eval_inputs(ws: Workspace, runner):
    """The benchmark's tokenised eval rows, the same for every model: FIUBench's forget and retain splits
    (`fiubench.prepare`), or MLLMU-Bench's sets as eval.py builds them (`mllmu.eval_py_inputs`, protocol original,
    where eval.py has a path for the model family) or one question at a time (`mllmu.mllmu_inputs`)."""
    from vlmu_jax.eval.tasks import fiubench, mllmu
    from vlmu_jax.eval.tasks.mllmu_prompts import FAMILIES

    c = ws.config
    if c.benchmark == "fiubench":
        return fiubench.prepare(ws.bench.split(_forget_split(ws)), ws.bench.split(c.eval.retain_split), runner)
    family = ws.hf_config.get("model_type", "")
    if ws.protocol.mllmu_eval_py and family not in FAMILIES:
        logging.warning("MLLMU-Bench's eval.py has no path for %s models (LLaVA and Idefics2 only): evaluating with "
                        "the corrected protocol's prompts", family)
    if ws.protocol.mllmu_eval_py and family in FAMILIES:
        return mllmu.eval_py_inputs(ws.bench, runner, forget_ratio=c.data.forget_ratio, family=family, seed=c.seed)
    return mllmu.mllmu_inputs(ws.bench, runner, forget_ratio=c.data.forget_ratio, seed=c.seed)


def _fiubench_logs(ws: Workspace, model: nnx.Module, runner, inputs, name: str, judge=None) -> dict[str, dict]:
    from vlmu_jax.eval.tasks.fiubench import add_gpt_scores, evaluate_model
    from vlmu_jax.report.aggregate import APE, FORGET, RETAIN

    forget_log, retain_log, ape = evaluate_model(model, inputs, runner, desc=name)
    logs = {FORGET: forget_log, RETAIN: retain_log}
    if judge is not None:
        client, prompt = judge
        first_question_of = runner.text.template if ws.protocol.fiubench_metric_quirks else None
        for task in (FORGET, RETAIN):
            add_gpt_scores(logs[task], client, prompt, first_question_of=first_question_of)
    for log in (*logs.values(), ape):
        log["protocol"] = ws.protocol.name
    # The aggregated file holds the forget and retain logs only: aggregate_eval_stat.py reads every entry of it as
    # one of those two, so APE has its own file.
    return {**logs, APE: ape, "eval_log_aggregated.json": logs}


def _mllmu_logs(ws: Workspace, model: nnx.Module, runner, inputs, judge=None) -> dict[str, dict]:
    from vlmu_jax.eval.tasks.mllmu import PROTOCOL_KEY, EvalPyInputs, add_factuality, evaluate_eval_py, evaluate_mllmu

    eval_py, draws = isinstance(inputs, EvalPyInputs), None
    if eval_py:
        results, draws = evaluate_eval_py(model, inputs, runner)
    else:
        results = evaluate_mllmu(model, inputs, runner)
    if judge is not None:
        add_factuality(results, *judge)
    predictions = {s: r.pop("predictions") for s, r in results.items()}
    record = {"name": ws.protocol.name, "seed": ws.config.seed, "eval_py_prompts": eval_py,
              **({"few_shot_ids": draws} if draws is not None else {})}
    return {"final_evaluation_results.json": {**results, PROTOCOL_KEY: record}, "predictions.json": predictions}


def report(ws: Workspace) -> None:
    """results.csv / results.json (one row per model, aggregate_eval_stat columns), PNG plots, a self-contained
    index.html, and the headline results printed as a table."""
    from vlmu_jax.report import plots
    from vlmu_jax.report.aggregate import fiubench_summary, read_ape_log, write_csv, write_json

    if jax.process_index() != 0:
        return
    results = ws.workdir / "eval_results"
    names = [n for n in eval_sources(ws) if is_done(results / n)]
    if not names:
        raise InputError(f"stage report: no finished evaluation results in {results} for "
                         f"{', '.join(eval_sources(ws))}: run the eval stage first")
    if ws.config.benchmark == "mllmu":
        _mllmu_report(ws, names)
        return
    logs = {n: json.loads((results / n / "eval_log_aggregated.json").read_text()) for n in names}
    reference = logs.get(model_sources.REFERENCE)
    if reference is None:
        say(f"report: no results of the reference model ({model_sources.REFERENCE}): Forget Quality is left out "
            "(evaluate one with --config.eval.reference_model=PATH)")
    rows = [{"Model": n, **fiubench_summary(logs[n], reference, ape_log=read_ape_log(results / n),
                                            method=n.removeprefix("unlearned_"),
                                            empty_lists_as_zero=ws.protocol.fiubench_metric_quirks),
             **_utility_row(ws, n), "Protocol": ws.protocol.name} for n in names]
    out = ws.workdir / "report"
    write_csv(rows, out / "results.csv")
    write_json({"protocol": ws.protocol.name, "rows": rows}, out / "results.json")
    (out / "tradeoff.png").unlink(missing_ok=True)
    if reference is not None:
        plots.plot_fq_vs_mu(rows, out / "tradeoff.png", reference=model_sources.REFERENCE)
    shown = ["Prob. Forget", "Prob. Retain", "ROUGE Forget", "ROUGE Retain", "Truth Ratio Forget",
             "Truth Ratio Retain", "Model Utility", "Exact Match"]
    plots.plot_metric_bars(rows, shown, out / "metrics.png", title="FIUBench metrics per model")
    _loss_plot(ws, names, out)
    _publish(ws, rows, out)


def _loss_plot(ws: Workspace, names: list[str], out: Path) -> None:
    """Training curves of the reported models trained in this workdir (none for given checkpoints)."""
    from vlmu_jax.report import plots

    logs = {n: ws.workdir / "train" / n / "metrics.jsonl" for n in names
            if (ws.workdir / "train" / n / "metrics.jsonl").exists()}
    (out / "loss_curves.png").unlink(missing_ok=True)
    if logs:
        plots.plot_loss_curves(logs, out / "loss_curves.png")


def _publish(ws: Workspace, rows: list[dict], out: Path) -> None:
    """index.html next to the CSV and plots, and the headline table on stdout (the results, not a log line)."""
    from vlmu_jax.report import html, table

    headline, sources = table.headline_columns(rows, ws.config.benchmark), eval_sources(ws)
    page = html.write_index(out, rows, headline=headline, sources={r["Model"]: str(sources[r["Model"]]) for r in rows},
                            config=json.loads((ws.workdir / "config.json").read_text()),
                            environment=json.loads((ws.workdir / "environment.json").read_text()))
    say(f"report: {page}")
    print(table.format_table(rows, headline), flush=True)


def _utility_row(ws: Workspace, name: str) -> dict:
    """MME / POPE columns of one model from its eval_results (none when those benchmarks did not run)."""
    from vlmu_jax.report.aggregate import utility_columns

    folder = ws.workdir / "eval_results" / name
    found = {k: json.loads((folder / f"{k}.json").read_text()) for k in ("mme", "pope")
             if (folder / f"{k}.json").exists()}
    return utility_columns(found.get("mme"), found.get("pope"))


def _mllmu_report(ws: Workspace, names: list[str]) -> None:
    """One row per model, one column per (set, metric) in eval.py's names, and a bar chart of accuracies."""
    from vlmu_jax.eval.tasks.mllmu import SET_NAMES
    from vlmu_jax.report import plots
    from vlmu_jax.report.aggregate import write_csv, write_json

    rows = []
    for name in names:
        res = json.loads((ws.workdir / "eval_results" / name / "final_evaluation_results.json").read_text())
        row = {"Model": name}
        for set_name, groups in res.items():
            if set_name not in SET_NAMES.values():
                continue
            for group, values in groups.items():
                row.update({f"{set_name} / {group} / {k}": v for k, v in values.items()})
        rows.append({**row, **_utility_row(ws, name)})
    out = ws.workdir / "report"
    write_csv(rows, out / "results.csv")
    write_json({"rows": rows}, out / "results.json")
    accuracy = [k for k in rows[0] if "/ classification /" in k]
    labels = [k.replace(" Results / classification / ", ": ").removesuffix(" Question Accuracy") for k in accuracy]
    plots.plot_metric_bars(rows, accuracy, out / "metrics.png", label_key="Model", labels=labels, horizontal=True,
                           title="MLLMU-Bench classification accuracy", value_label="accuracy (%)")
    _loss_plot(ws, names, out)
    _publish(ws, rows, out)
