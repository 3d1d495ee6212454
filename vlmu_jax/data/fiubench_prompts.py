"""FIUBench's generation prompts as `evaluate_util.run_generation` builds them (protocol `original`).

run_generation never renders a prompt from the question: it decodes the scored row (prompt + answer ids, the
image still one placeholder token) WITH special tokens, cuts the text at the answer tag (the tag's newlines
removed), strips spaces, appends the tag and tokenizes that string with special tokens. The decoded text starts
with the BOS token's text, so the prompt starts with two BOS ids; and since the tag loses its newlines, a
template whose tag ends in newlines (Llama-3.2-Vision's) is prompted without them. The text after the tag,
stripped, is the reference ROUGE scores against: the answer as the tokenizer decodes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlmu_jax.data.batching import Encoded, Example, TextConfig, expand, text_ids_all


@dataclass(frozen=True)
class GenerationPrompt:
    """One question's generation input and the two strings the original derives with it."""

    row: Encoded  # the prompt ids (image expanded), no labels
    prompt: str  # the decoded prompt string (the original logs it as generated_text[0])
    reference: str  # the decoded answer (generated_text[2], ROUGE's reference)


def roundtrip_prompts(examples: Sequence[Example], cfg: TextConfig) -> list[GenerationPrompt]:
    """The generation prompt of each example (question AND answer: the answer's ids are what gets decoded); the
    rows tokenised, decoded and the prompts tokenised again in one tokenizer call each (`text_ids_all`'s why)."""
    rows = text_ids_all(examples, cfg)
    texts = cfg.tokenizer.batch_decode([ids for ids, _ in rows])
    tag = cfg.template.answer_prefix.replace("\n", "")
    cut = []
    for example, text in zip(examples, texts, strict=True):
        parts = text.split(tag)
        if len(parts) < 2:
            raise ValueError(f"example {example.uid!r}: answer tag {tag!r} not in the decoded row {text!r} (the "
                             "original fails here too: IndexError in run_generation)")
        cut.append((parts[0].strip(" ") + tag, parts[1].strip(" ")))
    prompt_ids = cfg.tokenizer([prompt for prompt, _ in cut])["input_ids"] if cut else []
    return [GenerationPrompt(expand(list(ids), [False] * len(ids), example, cfg), prompt, reference)
            for example, ids, (prompt, reference) in zip(examples, prompt_ids, cut, strict=True)]
