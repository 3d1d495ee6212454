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
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from vlmu_jax.data.batching import IGNORE, ExampleSource, encode, examples_from
from vlmu_jax.data.records import Identity
from vlmu_jax.eval.scoring import compute_token_logprobs, head_kl
from vlmu_jax.models import lora
from vlmu_jax.pipeline import Workspace, is_done, mark_done
from vlmu_jax.unlearn.trainer import TrainConfig, train

_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "preprocessor_config.json", "chat_template.jinja", "generation_config.json")


def logps_fn(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Answer-token log-probs of a batch and their mask, for the trainer's objectives."""
    logps = compute_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["images"])
    return logps, batch["labels"][:, 1:] != IGNORE


def kl_fn(model: nnx.Module, ref_model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Full-vocabulary KL(reference || model) at every real token of the batch."""
    args = (batch["input_ids"], batch["attention_mask"], batch["images"])
    hidden, ref_hidden = model(*args)[:, :-1], jax.lax.stop_gradient(ref_model(*args)[:, :-1])
    kl = head_kl(hidden, ref_hidden, model.head_weight(), jax.lax.stop_gradient(ref_model.head_weight()))
    return kl, batch["attention_mask"][:, 1:] > 0


def kl_fn_every_position(model: nnx.Module, ref_model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Full-vocabulary KL(reference || model) at every position of the padded batch, the last and the padding
    included: MLLMU-Bench KL_Min's kl_div over the [B, T, V] logits. Its batch is padded to its longest row; the
    columns our bucket adds beyond that are left out."""
    args = (batch["input_ids"], batch["attention_mask"], batch["images"])
    hidden, ref_hidden = model(*args), jax.lax.stop_gradient(ref_model(*args))
    kl = head_kl(hidden, ref_hidden, model.head_weight(), jax.lax.stop_gradient(ref_model.head_weight()))
    return kl, jnp.broadcast_to(jnp.any(batch["attention_mask"] > 0, axis=0), kl.shape)


def kl_fn_for(ws: Workspace):
    return kl_fn_every_position if ws.protocol.mllmu_baselines else kl_fn


def objective_config(ws: Workspace, cfg: TrainConfig) -> TrainConfig:
    """The protocol's objective reductions: MLLMU-Bench's NPO compares batch-mean losses."""
    return dataclasses.replace(cfg, npo_batch_mean=True) if ws.protocol.mllmu_baselines else cfg


# find_all_linear_names collects names outside HF modules named *multi_modal_projector* / *vision_model*: our
# vision_tower always, our multi_modal_projector for LLaVA only (Idefics2's is HF's `connector`, which it keeps).
_PEFT_SKIPPED = {"llava": ("vision_tower", "multi_modal_projector"), "idefics2": ("vision_tower",)}


def lora_targets(ws: Workspace, model: nnx.Module, stage: ml_collections.ConfigDict) -> str:
    """The LoRA targets regex: MLLMU-Bench's PEFT suffix rule under its original protocol, else the stage's."""
    if not ws.protocol.mllmu_peft_lora:
        return stage.lora_targets
    skip = _PEFT_SKIPPED.get(ws.hf_config.get("model_type", ""), ("vision_tower", "multi_modal_projector"))
    return lora.suffix_targets(model, skip=skip)


def _source(ws: Workspace, identities: list[Identity], stage: ml_collections.ConfigDict, *, seed: int,
            idk: tuple[str, ...] = ()) -> ExampleSource:
    shards = ws.mesh.shape["data"] * ws.mesh.shape["fsdp"]
    if stage.batch_size % shards:
        raise ValueError(f"batch_size {stage.batch_size} does not split over the mesh's {shards} data-parallel "
                         f"shards (mesh {dict(ws.mesh.shape)}): use a multiple of {shards}")
    rows = [encode(e, ws.text_config) for e in examples_from(identities, idk=idk, seed=seed)]
    if not rows:
        raise ValueError("a training stream has no examples: check the split names and the data folder")
    return ExampleSource(rows, global_batch_size=stage.batch_size, pad_token_id=ws.tokenizer.pad_token_id,
                         image_fn=ws.image_fn, seed=seed)


def _prepare_trainable(ws: Workspace, model: nnx.Module, stage: ml_collections.ConfigDict, seed: int):
    """Adds LoRA when asked and returns the NNX filter of what trains."""
    use_lora = stage.lora_rank > 0
    if use_lora:
        lora.apply_lora(model, rank=stage.lora_rank, alpha=stage.lora_alpha, dropout=stage.lora_dropout,
                        targets=lora_targets(ws, model, stage), seed=seed,
                        init="gaussian" if ws.protocol.mllmu_peft_lora else "kaiming")
    return lora.trainable_filter(lora=use_lora, tune_vision_tower=stage.tune_vision_tower,
                                 tune_mm_projector=stage.tune_mm_projector,
                                 tune_language_model=stage.tune_language_model)


def _save_model(ws: Workspace, model: nnx.Module, out: Path, dtype=None, info: dict | None = None) -> None:
    """Merged HF folder plus the base checkpoint's tokenizer and processor files (and `export_info.json`: `info`
    with the source tree's commit, when given)."""
    from vlmu_jax import provenance
    from vlmu_jax.checkpoints.hf_export import export_hf

    lora.merge_lora(model)
    export_hf(model, out, dtype=dtype)
    if jax.process_index() == 0:
        for name in _SIDE_FILES:
            if (ws.base_model / name).exists():
                shutil.copy2(ws.base_model / name, out / name)
        if info is not None:
            commit = provenance.git_commit(Path(__file__).resolve().parent.parent)
            record = {**info, "commit": commit, "dtype": str(dtype) if dtype is not None else None}
            (out / "export_info.json").write_text(json.dumps(record, indent=2))
    mark_done(out)


def _train_model(ws: Workspace, *, start: str, out_name: str, stage: ml_collections.ConfigDict,
                 sources: dict[str, ExampleSource], objective: str | None = None, reference: str | None = None) -> None:
    """Trains model folder ``start`` into ``out_name``; ``reference`` names the reference model's folder when it is
    not ``start`` with LoRA off."""
    out = ws.model_dir(out_name)
    if is_done(out) and not ws.config.force:
        logging.info("%s exists, skipping (config.force=True redoes it)", out)
        return
    model = ws.load(start)
    trainable = _prepare_trainable(ws, model, stage, ws.config.seed)
    ref_model = None
    if reference is not None:
        ref_model = ws.load(reference)
        _prepare_trainable(ws, ref_model, stage, ws.config.seed)  # the same graph; its zero adapters change nothing
    run_dir = ws.workdir / "train" / out_name
    if ws.config.force:
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg = objective_config(ws, TrainConfig.from_config(stage))
    if objective is not None:
        cfg = dataclasses.replace(cfg, objective=objective)
    result = train(model, cfg, sources=sources, logps_fn=logps_fn, kl_fn=kl_fn_for(ws),
                   workdir=run_dir, trainable=trainable, mesh=ws.mesh, reference=ref_model)
    logging.info("%s: %d steps, last loss %.4f", out_name, result.step, result.losses[-1] if result.losses
                 else float("nan"))
    _save_model(ws, model, out)


def finetune(ws: Workspace) -> None:
    """The vanilla model (all identities) and its retain-only twin (the forget-quality reference)."""
    c, bench = ws.config, ws.bench
    forget = set(bench.splits[_forget_split(ws)])
    everyone = list(bench.identities)
    retained = [i for i in everyone if i.uid not in forget]
    _train_model(ws, start="base", out_name="finetuned", stage=c.finetune,
                 sources={"train": _source(ws, everyone, c.finetune, seed=c.seed)})
    _train_model(ws, start="base", out_name="retain_model", stage=c.retain_model,
                 sources={"train": _source(ws, retained, c.retain_model, seed=c.seed)})


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
    c, bench = ws.config, ws.bench
    forget, retain = bench.split(_forget_split(ws)), bench.split(_retain_split(ws))
    sources = {"forget": _source(ws, forget, c.unlearn, seed=c.seed),
               "retain": _source(ws, retain, c.unlearn, seed=c.seed + 1)}
    if bench.idk:
        sources["idk"] = _source(ws, forget, c.unlearn, seed=c.seed, idk=bench.idk)
    for objective in objectives(ws):
        _train_model(ws, start="finetuned", out_name=f"unlearned_{objective}", stage=c.unlearn,
                     objective=objective, **_mllmu_npo(ws, objective, sources))


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
    trainable = _prepare_trainable(ws, model, stage, ws.config.seed)
    params = nnx.state(model, trainable)
    nnx.update(model, restore_part(ckpt_dir, step, params, index=0))  # the trainer saves (params, opt, rng)
    return model


def _runner(ws: Workspace):
    from vlmu_jax.eval.tasks.fiubench import Runner

    return Runner(text=ws.eval_text_config, batch_size=ws.config.eval.batch_size, image_fn=ws.eval_image_fn,
                  max_new_tokens=ws.config.eval.max_new_tokens, mesh=ws.mesh,
                  original=ws.protocol.fiubench_metric_quirks)


def eval(ws: Workspace) -> None:  # noqa: A001 - the stage is called eval in configs
    """Per-question logs of every trained model: FIUBench forget/retain/APE, or MLLMU-Bench's four sets; the
    judge's scores when one is configured; MME / POPE (``mme.json`` / ``pope.json``) when their paths are set."""
    from vlmu_jax.report.aggregate import write_json

    runner = _runner(ws)
    utility = _utility_inputs(ws)  # read and checked before any model runs
    judge = None
    for name in eval_models(ws):
        out = ws.workdir / "eval_results" / name
        if not ws.model_dir(name).exists() or (is_done(out) and not ws.config.force):
            continue
        model = ws.load(name)
        judge = judge or _judge(ws)
        logs = _fiubench_logs(ws, model, runner, name, judge) if ws.config.benchmark == "fiubench" else \
            _mllmu_logs(ws, model, runner, judge)
        logs.update(_utility_logs(model, runner, utility, name))
        if jax.process_index() == 0:
            for file, log in logs.items():
                write_json(log, out / file)
        mark_done(out)


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


def _fiubench_logs(ws: Workspace, model: nnx.Module, runner, name: str, judge=None) -> dict[str, dict]:
    from vlmu_jax.eval.tasks.fiubench import add_gpt_scores, evaluate_ape, evaluate_split
    from vlmu_jax.report.aggregate import APE, FORGET, RETAIN

    forget, retain = ws.bench.split(_forget_split(ws)), ws.bench.split(ws.config.eval.retain_split)
    logs = {FORGET: evaluate_split(model, forget, runner, forget=True, desc=f"{name} forget"),
            RETAIN: evaluate_split(model, retain, runner, forget=False, desc=f"{name} retain"),
            APE: evaluate_ape(model, forget, runner, desc=f"{name} forget")}
    if judge is not None:
        for task in (FORGET, RETAIN):
            add_gpt_scores(logs[task], *judge)
    return {**logs, "eval_log_aggregated.json": logs}


def _mllmu_logs(ws: Workspace, model: nnx.Module, runner, judge=None) -> dict[str, dict]:
    from vlmu_jax.eval.tasks.mllmu import PROTOCOL_KEY, add_factuality, evaluate_eval_py, evaluate_mllmu

    c, draws = ws.config, None
    if ws.protocol.mllmu_eval_py:
        results, draws = evaluate_eval_py(model, ws.bench, runner, forget_ratio=c.data.forget_ratio,
                                          family=ws.hf_config.get("model_type", ""), seed=c.seed)
    else:
        results = evaluate_mllmu(model, ws.bench, runner, forget_ratio=c.data.forget_ratio, seed=c.seed)
    if judge is not None:
        add_factuality(results, *judge)
    predictions = {s: r.pop("predictions") for s, r in results.items()}
    record = {"name": ws.protocol.name, "seed": c.seed, **({"few_shot_ids": draws} if draws is not None else {})}
    return {"final_evaluation_results.json": {**results, PROTOCOL_KEY: record}, "predictions.json": predictions}


def report(ws: Workspace) -> None:
    """results.csv / results.json (one row per model, aggregate_eval_stat columns) and PNG plots."""
    from vlmu_jax.report import plots
    from vlmu_jax.report.aggregate import fiubench_summary, write_csv, write_json

    if jax.process_index() != 0:
        return
    results = ws.workdir / "eval_results"
    names = [n for n in eval_models(ws) if is_done(results / n)]
    if ws.config.benchmark == "mllmu":
        _mllmu_report(ws, names)
        return
    if "retain_model" not in names:
        raise FileNotFoundError(f"{results / 'retain_model'} has no eval logs: run the eval stage first")
    logs = {n: json.loads((results / n / "eval_log_aggregated.json").read_text()) for n in names}
    rows = [{"Model": n, **fiubench_summary(logs[n], logs["retain_model"], method=n.removeprefix("unlearned_"),
                                            empty_lists_as_zero=ws.protocol.fiubench_metric_quirks),
             **_utility_row(ws, n)} for n in names]
    out = ws.workdir / "report"
    write_csv(rows, out / "results.csv")
    write_json({"rows": rows}, out / "results.json")
    plots.plot_fq_vs_mu(rows, out / "tradeoff.png")
    shown = ["Prob. Forget", "Prob. Retain", "ROUGE Forget", "ROUGE Retain", "Truth Ratio Forget",
             "Truth Ratio Retain", "Model Utility", "Exact Match"]
    plots.plot_metric_bars(rows, shown, out / "metrics.png")
    plots.plot_loss_curves({n: ws.workdir / "train" / n / "metrics.jsonl" for n in eval_models(ws)
                            if (ws.workdir / "train" / n / "metrics.jsonl").exists()}, out / "loss_curves.png")
    logging.info("report written to %s", out)


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
    plots.plot_metric_bars(rows, accuracy, out / "metrics.png")
    plots.plot_loss_curves({n: ws.workdir / "train" / n / "metrics.jsonl" for n in names
                            if (ws.workdir / "train" / n / "metrics.jsonl").exists()}, out / "loss_curves.png")
