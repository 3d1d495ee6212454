"""FIUBench evaluation of one model: per split, the per-question log of `evaluate_util.py`; APE on the forget split.

Every (question, answer) pair the metrics need (ground truth, paraphrased answer, each perturbed
answer) is scored in ONE batched pass, and all generations in one more, so a split costs a few
compiled shapes however many questions it has. The returned dict uses the original key names
(avg_gt_loss, avg_paraphrased_loss, average_perturb_loss, rougeL_recall, generated_text,
exact_match, mink, mink++, loss, zlib) so existing FIUBench tooling can read our JSON.

What the protocol decides here (`vlmu_jax.protocol`): the generation prompts and ROUGE references
(`fiubench_generation_roundtrip`: run_generation's decode / re-encode, see `data.fiubench_prompts`), the
metric quirks (`fiubench_metric_quirks`) and the logged fields (`fiubench_log_layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlmu_jax.data.batching import IGNORE, Encoded, Example, TextConfig, encode_all, generation_rows
from vlmu_jax.data.fiubench_prompts import roundtrip_prompts
from vlmu_jax.data.records import IMAGE, Identity
from vlmu_jax.data.templates import Template
from vlmu_jax.eval import attacks, judge, metrics, mia
from vlmu_jax.eval.batched import BatchCap, Pass, after, compile_ahead, generate_pass, run_passes, score_pass
from vlmu_jax.eval.result_logs import FiuTaskResults, fiubench_eval_log
from vlmu_jax.protocol import Protocol

ORIGINAL_CATEGORY = "human_face"  # data_module labels every FIUBench sample so


@dataclass(frozen=True)
class Runner:
    """How to put rows through the model: everything except the model and the data."""

    text: TextConfig
    batch_size: int
    image_fn: Callable  # ImageRef | None -> the model's image inputs for one row
    max_new_tokens: int
    protocol: Protocol
    mesh: Mesh | None = None
    shared_prompts: bool = True  # config eval.shared_prompts (batched.score_pass)
    cap: BatchCap = BatchCap()  # config eval.max_batch_tokens / max_batch_image_mb (batched.rows_per_batch)

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer

    def batching(self) -> dict[str, Any]:
        """The arguments every batched pass of `eval.batched` takes from the runner."""
        return dict(batch_size=self.batch_size, pad_token_id=self.tokenizer.pad_token_id, image_fn=self.image_fn,
                    mesh=self.mesh, cap=self.cap)

    def generating(self) -> dict[str, Any]:
        """What a generation pass (and its compile-ahead) takes besides: the EOS ids and the new-token budget."""
        return dict(eos_token_id=self.tokenizer.eos_token_id, max_new_tokens=self.max_new_tokens)


@dataclass(frozen=True)
class Prompts:
    """Generation inputs of some examples and what the log shows for them, per the protocol."""

    rows: list[Encoded]
    shown: list[str]  # generated_text[0]: the question (corrected) or the decoded prompt string (original)
    references: list[str]  # ROUGE's reference: the answer string or the decoded answer


def generation_prompts(examples: Sequence[Example], runner: Runner) -> Prompts:
    """Corrected: the template's prompt, one BOS, the answer as reference. Original: run_generation's round trip."""
    if runner.protocol.fiubench_generation_roundtrip:
        built = roundtrip_prompts(examples, runner.text)
        return Prompts([b.row for b in built], [b.prompt for b in built], [b.reference for b in built])
    rows = generation_rows([Example(e.question, "", e.image, e.uid) for e in examples], runner.text)
    return Prompts(rows, [e.question for e in examples], [e.answer for e in examples])


def decode_generations(generated: Sequence[np.ndarray], runner: Runner) -> list[str]:
    """New tokens to text, special tokens skipped; the original does not strip the text, we do."""
    texts = [runner.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    return texts if runner.protocol.fiubench_generation_roundtrip else [t.strip() for t in texts]


def _questions(identities: Sequence[Identity]) -> list[tuple[Identity, Any]]:
    return [(ident, qa) for ident in identities for qa in ident.qa if qa.modality == IMAGE]


def scoring_examples(identities: Sequence[Identity]) -> tuple[list[Example], int]:
    """Per question, in order: (question, answer), (question, paraphrased answer), (question, perturbed_j)...;
    and K, the number of perturbed answers (the same for every question, as the original's tensors need)."""
    items = _questions(identities)
    if not items:
        raise ValueError("no image questions to evaluate")
    n_pert = {len(qa.perturbed_answers) for _, qa in items}
    if len(n_pert) != 1 or 0 in n_pert:
        raise ValueError(f"every question needs the same non-zero number of perturbed answers, "
                         f"found counts {sorted(n_pert)}")
    examples: list[Example] = []
    for ident, qa in items:
        examples.append(Example(qa.question, qa.answer, ident.image, ident.uid))
        examples.append(Example(qa.question, qa.paraphrased_answer or qa.answer, ident.image, ident.uid))
        examples.extend(Example(qa.question, p, ident.image, ident.uid) for p in qa.perturbed_answers)
    return examples, n_pert.pop()


@dataclass(frozen=True)
class _SplitRows:
    """One split's questions, scoring rows (per question: ground truth, paraphrased, K perturbed) and generation
    prompts: the same for every model."""

    items: list[tuple[Identity, Any]]
    rows: list[Encoded]
    k: int
    prompts: Prompts


def _split_rows(identities: Sequence[Identity], runner: Runner) -> _SplitRows:
    examples, k = scoring_examples(identities)
    return _SplitRows(_questions(identities), encode_all(examples, runner.text), k,
                      generation_prompts(examples[:: 2 + k], runner))


@dataclass(frozen=True)
class Inputs:
    """What FIUBench's eval puts through every model, tokenised: the forget and retain splits' rows and prompts,
    and APE's variants with their prompts. Made once per eval stage (`prepare`) and given to each model's
    `evaluate_model`. Why: making them (tokenising ~10k rows at FIUBench's splits) is host work the devices waited
    for before each model's passes, the same for every model."""

    forget: _SplitRows
    retain: _SplitRows
    ape_variants: list[attacks.ApeVariant]
    ape_prompts: Prompts


def prepare(forget: Sequence[Identity], retain: Sequence[Identity], runner: Runner) -> Inputs:
    """`Inputs` of the forget and retain identities under `runner`'s text config and protocol."""
    variants, asked = ape_examples(forget, runner.protocol)
    if not variants:
        raise ValueError("no paraphrased questions: FIUBench's APE needs them")
    return Inputs(_split_rows(forget, runner), _split_rows(retain, runner), variants, generation_prompts(asked, runner))


@dataclass(frozen=True)
class _SplitPasses:
    """One split's scoring and generation passes and what its log is made from."""

    split: _SplitRows
    scores: Pass
    generated: Pass

    def log(self, runner: Runner, *, forget: bool) -> dict[str, Any]:
        s = self.split
        texts = decode_generations(self.generated.out, runner)
        return _log(s.items, s.rows, self.scores.out, s.prompts, texts, s.k, runner, forget=forget)


def _split_passes(model: nnx.Module, split: _SplitRows, runner: Runner, desc: str) -> _SplitPasses:
    return _SplitPasses(split,
                        score_pass(model, split.rows, **runner.batching(), shared_prompts=runner.shared_prompts,
                                   desc=f"{desc} score"),
                        generate_pass(model, split.prompts.rows, **runner.batching(), **runner.generating(),
                                      desc=f"{desc} generate"))


def compile_programs(model: nnx.Module, inputs: Inputs, runner: Runner) -> Callable[[], None]:
    """`batched.compile_ahead` of every program `evaluate_model(model, inputs, runner)` runs (scoring's compiled on
    return, generation's once the function returned has returned): for the model itself, or for a stand-in of it
    (shapes only) while it loads."""
    return compile_ahead(model, to_score=[inputs.forget.rows, inputs.retain.rows],
                         to_generate=[inputs.forget.prompts.rows, inputs.retain.prompts.rows, inputs.ape_prompts.rows],
                         **runner.batching(), **runner.generating(), shared_prompts=runner.shared_prompts)


def evaluate_model(model: nnx.Module, inputs: Inputs, runner: Runner, *,
                   desc: str = "") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The forget and retain splits' logs (per-question losses, truth ratio, generations, ROUGE, EM, MIA) and the
    forget split's APE log, in that order, of `inputs` (`prepare`'s, under the same runner).

    Every shape of the three is compiled ahead at once, and their five passes run as one stream of device calls
    (`batched.run_passes`): evaluated one after another, the devices sat idle at every pass boundary while the
    host finished one pass and began the next. Scoring comes first (forget, retain): it starts once its own
    programs are compiled, while generation's still compile. Then retain's generation, forget's and APE's (forget
    images): each pass first shows the images its predecessor showed last, so a features cache that holds less
    than both splits' images makes each image's features at most twice. In the order forget, retain, forget,
    retain, forget, such a cache made every image's features once per pass (Llama-3.2-11B-Vision at FIUBench's
    splits, 52 MB an image against the 4 GB default of eval.image_embeddings_mb: 717 features programs for three
    models, ~240 a model; in this order ~140 a model by the cache's count, bench/RESULTS.md session 34).
    APE (adversarial privacy extraction) asks every paraphrase of every forget question with the image; its log
    (`eval_forget_ape_log.json`) holds per-variant EM / ROUGE and the question each came from."""
    splits = [_split_passes(model, inputs.forget, runner, f"{desc} forget"),
              _split_passes(model, inputs.retain, runner, f"{desc} retain")]
    ape_prompts = inputs.ape_prompts
    ape = generate_pass(model, ape_prompts.rows, **runner.batching(), **runner.generating(), desc=f"{desc} forget APE")
    ready = compile_programs(model, inputs, runner)
    forget_passes, retain_passes = splits
    run_passes([forget_passes.scores, retain_passes.scores,
                *(after(ready, p) for p in (retain_passes.generated, forget_passes.generated, ape))])
    variants = inputs.ape_variants
    scored = attacks.score_ape(variants, decode_generations(ape.out, runner), references=ape_prompts.references,
                               original=runner.protocol.fiubench_metric_quirks)
    scored["question"] = [v.question for v in variants]
    scored["qa_index"] = [v.qa_index for v in variants]
    return splits[0].log(runner, forget=True), splits[1].log(runner, forget=False), scored


def _log(items, rows, scores, prompts: Prompts, texts: list[str], k: int, runner: Runner, *,
         forget: bool) -> dict[str, Any]:
    stride, tok, p = 2 + k, runner.tokenizer, runner.protocol

    def nll(score) -> tuple[float, int]:
        logps = score.logps[1:] if p.fiubench_metric_quirks else score.logps  # the seeds' off-by-one
        return float(-logps.sum()), int(score.logps.size)

    gt, para, pert, mia_rows = [], [], [], []
    for i in range(len(items)):
        g = scores[i * stride]
        gt.append(nll(g))
        para.append(nll(scores[i * stride + 1]))
        pert.append([nll(s) for s in scores[i * stride + 2: (i + 1) * stride]])
        gt_row = rows[i * stride]  # the seeds decode the labelled answer tokens after the first for zlib
        tail = tok.decode(gt_row.input_ids[gt_row.labels != IGNORE][1:])
        mia_rows.append(mia.question_scores(g.logps, g.mu, g.var, tail))
    texts = [metrics.truncate_at_first_period(t, original=p.fiubench_metric_quirks) for t in texts]
    pert_arr = np.array(pert)
    categories = [ORIGINAL_CATEGORY if p.fiubench_log_layout else qa.category for _, qa in items]
    results = FiuTaskResults(
        gt_loss=np.array([x[0] for x in gt]), gt_num_tokens=np.array([x[1] for x in gt]),
        paraphrased_loss=np.array([x[0] for x in para]), paraphrased_num_tokens=np.array([x[1] for x in para]),
        perturb_loss=pert_arr[..., 0], perturb_num_tokens=pert_arr[..., 1],
        prompts=prompts.shown, generations=texts, references=prompts.references,
        categories=categories, keywords=[list(qa.keywords) for _, qa in items],
        mia_scores={key: [row[key] for row in mia_rows] for key in mia_rows[0]},
    )
    return fiubench_eval_log(results, forget=forget, original_metrics=p.fiubench_metric_quirks,
                             original_layout=p.fiubench_log_layout)


def ape_examples(identities: Sequence[Identity], protocol: Protocol) -> tuple[list[attacks.ApeVariant],
                                                                            list[Example]]:
    """APE's variants and what each asks: its paraphrased question with the identity's image and the answer (the
    original's generation prompt is decoded from question + answer ids)."""
    items = _questions(identities)
    records = [{"paraphrased_question": list(qa.paraphrased_questions), "answer": qa.answer,
                "keywords": list(qa.keywords)} for _, qa in items]
    variants = attacks.ape_variants(records, three_per_question=protocol.fiubench_metric_quirks)
    asked = [Example(v.question, v.answer, items[v.qa_index][0].image, items[v.qa_index][0].uid) for v in variants]
    return variants, asked


def judge_question(shown: str, template: Template) -> str:
    """The question the original's judge sees for every item of a split: the FIRST item's decoded prompt with the
    template's tags (newlines removed from each) deleted and spaces / newlines stripped (get_all_evals)."""
    for tag in (template.user_prefix, template.question_end, template.system, template.answer_prefix):
        shown = shown.replace(tag.replace("\n", ""), "")
    return shown.strip(" ").strip("\n").strip(" ")


def add_gpt_scores(log: dict[str, Any], client: judge.JudgeClient, prompt: judge.JudgePrompt | None = None, *,
                   first_question_of: Template | None = None) -> None:
    """Adds the per-question GPT score (`gpt` list, question order) of a task log's generations, and
    `gpt_unparsed`: how many verdicts had no number (scored 0.0, as the original does).

    The judge gets each item's own question; with `first_question_of` (the template; protocol original) it gets
    what get_all_evals passes: the split's first logged prompt, cleaned by :func:`judge_question`, for every
    item."""
    rows = [log["generated_text"][str(i)] for i in range(len(log["generated_text"]))]
    if first_question_of is not None:
        first = judge_question(rows[0][0], first_question_of)
        rows = [[first, *row[1:]] for row in rows]
    log["gpt"], log["gpt_unparsed"] = judge.fiubench_gpt_scores(
        client, [(question, answer, prediction) for question, prediction, answer, _ in rows], prompt)
