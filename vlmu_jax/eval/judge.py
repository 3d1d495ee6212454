"""LLM judge (FIUBench GPT score, MLLMU-Bench factuality) over any OpenAI-compatible chat endpoint.

stdlib only (urllib): POST ``{base_url}/chat/completions`` (``base_url`` ends in ``/v1``), bearer key read
from an environment variable, per-request timeout, retries with exponential backoff on 429/5xx/timeouts, and
an on-disk JSON cache keyed by ``sha256(model, system, prompt)`` so a rerun sends nothing.

The prompts are our own wording of what the originals ask:
- FIUBench (gray311/VLM_Unlearned ``evaluate_util.gpt_prompt``, ``gpt_eval.py``): factual consistency of a
  prediction with the answer about a fictitious entity, score 0..1 with two decimals ON THE FIRST LINE; the
  parser takes the first line, the text after a ':' if any, strips '**', and yields 0.0 when that is not a
  number. Predictions of at most 5 characters score 0.0 with no request (as the original). The original
  model is gpt-4o-mini with max_tokens 20.
- MLLMU-Bench (``eval_gpt.evaluate_factuality_questions``): factuality 1..10 on a line containing
  "Factuality Score"; the parser takes the text after the last ':' on that line, drops commas and reads an
  int; unparsable -> None (left out of the mean, as the original).

The wording decides the numbers, and ours is not the originals': ``eval.judge_prompt_file`` /
``eval.judge_system_file`` point at text files that replace the user / system message (``str.format``
placeholders as in :data:`PLACEHOLDERS`), so a user can put the original prompt text there.

Batching: :meth:`JudgeClient.complete_many` sends only the prompts not in the cache; over HTTP one request
per prompt (the cache saved after each), with a ``local`` backend (``eval/local_judge.py``: a vlmu_jax
checkpoint and the batched KV-cache generator) in chunks, the cache saved after each chunk.

Difference: ``evaluate_util.get_all_evals`` builds the judge's question from ``input_strings[0]``, the FIRST
question of the split, for every item (the list grows across batches); we pass each item's own question.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIUBENCH_SYSTEM = ""
MLLMU_SYSTEM = "You judge how factually correct a generated response is."
FIUBENCH_MAX_TOKENS, MLLMU_MAX_TOKENS = 20, 700  # the originals' max_tokens

FIUBENCH_PROMPT = """You grade answers to questions about fictitious people for factual agreement
with a reference.
Compare the prediction with the correct answer:
- judge facts only; paraphrases and synonyms count as matches, wording and sentence style do not matter;
- anything the prediction states that the correct answer does not is a hallucination and lowers the score;
- key words of the question and correct answer matter: a prediction containing them tends to score higher.

Line 1: only the score, a number from 0 to 1 with two decimals (e.g. 0.00, 0.37, 0.92, 1.00);
higher is better.
Line 2: the key words of the question and correct answer.
Line 3: a short, unbiased explanation of the score.

Question: {question}
Correct Answer: {answer}
Prediction: {prediction}

Score, key words, explanation:"""

MLLMU_PROMPT = """Rate the factuality of a generated answer against its ground truth,
from 1 to 10:
10-9 fully correct with the same meaning (wording may differ);
8-7 mostly correct, minor details missing or off;
6-5 partly correct with a clear factual error or a notable omission;
4-3 major errors or crucial parts missing;
2-1 nonsensical, wrong or irrelevant.
Extra details help only when relevant and correct; irrelevant or excessive details lower the score.

Task type: {task_type}
Image ID: {image_id}
Question: {question}
Generated Answer: {generated_answer}
Ground Truth: {ground_truth}

Reply in this form:
{{
    "Factuality Score": <1-10>,
    "Justification": "<one short sentence>"
}}"""


# Placeholders each benchmark's prompt is formatted with; the required ones must appear in a custom template.
PLACEHOLDERS = {
    "fiubench": {"question", "answer", "prediction"},
    "mllmu": {"task_type", "image_id", "question", "generated_answer", "ground_truth"},
}
REQUIRED = {"fiubench": {"question", "answer", "prediction"},
            "mllmu": {"question", "generated_answer", "ground_truth"}}


@dataclass(frozen=True)
class JudgePrompt:
    """The user-message template (``str.format`` fields) and the system message of one benchmark's judge."""

    user: str
    system: str = ""

    def format(self, **fields: str) -> str:
        return self.user.format(**fields)


def default_prompt(benchmark: str) -> JudgePrompt:
    return {"fiubench": JudgePrompt(FIUBENCH_PROMPT, FIUBENCH_SYSTEM),
            "mllmu": JudgePrompt(MLLMU_PROMPT, MLLMU_SYSTEM)}[benchmark]


def load_prompt(benchmark: str, prompt_file: str = "", system_file: str = "") -> JudgePrompt:
    """The benchmark's judge prompt, its user / system message replaced by the files given (empty = ours).

    A template must use only the benchmark's placeholders and contain the required ones; literal braces are
    written ``{{`` / ``}}``. Errors name the file and the placeholders.
    """
    prompt = default_prompt(benchmark)
    user = Path(prompt_file).read_text() if prompt_file else prompt.user
    system = Path(system_file).read_text().strip("\n") if system_file else prompt.system
    allowed, required = PLACEHOLDERS[benchmark], REQUIRED[benchmark]
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(user) if f is not None}
        user.format(**{k: "" for k in allowed})
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"judge prompt {prompt_file or '(built-in)'}: bad placeholder {err}; "
                         f"allowed: {sorted(allowed)} (write literal braces as {{{{ }}}})") from err
    if required - used:
        raise ValueError(f"judge prompt {prompt_file}: missing placeholder(s) {sorted(required - used)}; "
                         f"a {benchmark} judge prompt needs {sorted(required)}")
    return JudgePrompt(user, system)


# A batched text generator standing in for the HTTP endpoint: (prompts, system, max_tokens) -> replies.
Backend = Callable[[Sequence[str], str, int], list[str]]


class JudgeError(RuntimeError):
    """The endpoint did not give a verdict after all retries (or refused the request outright)."""


def parse_fiubench_score(text: str) -> float:
    """FIUBench score from a verdict: first line, after ':' if present, '**' stripped; 0.0 if not a number."""
    value = parse_fiubench_score_or_none(text)
    return 0.0 if value is None else value


def parse_fiubench_score_or_none(text: str) -> float | None:
    """As :func:`parse_fiubench_score`, None where the original would silently give 0.0."""
    score = text.split("\n")[0].strip(" ")
    if ":" in score:
        score = score[score.find(":"):].strip(":").strip(" ")
    if "**" in score:
        score = score.strip("*").strip(" ")
    try:
        return float(score)
    except ValueError:
        return None


def parse_mllmu_factuality(text: str) -> int | None:
    """MLLMU-Bench factuality 1..10 from the "Factuality Score" line; None when absent or not an int."""
    lines = [line for line in text.split("\n") if "Factuality Score" in line]
    if not lines:
        return None
    try:
        return int(lines[0].split(":")[-1].strip().replace(",", ""))
    except ValueError:
        return None


def cache_key(model: str, system: str, prompt: str) -> str:
    """Stable cache key: a verdict depends on the judge model and the exact messages, nothing else."""
    return hashlib.sha256(json.dumps([model, system, prompt]).encode("utf-8")).hexdigest()


@dataclass
class JudgeClient:
    """A cached, retrying chat-completions client. ``requests_sent`` counts real HTTP attempts."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    cache_path: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_tokens: int = 256
    requests_sent: int = 0
    backend: Backend | None = None  # set: replies come from this batched generator instead of HTTP
    chunk_size: int = 64  # prompts per backend call (the cache is saved after each)
    write_cache: bool = True  # False on every process but one when all run the local backend
    _cache: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.cache_path and Path(self.cache_path).exists():
            self._cache = json.loads(Path(self.cache_path).read_text())

    def complete(self, prompt: str, system: str = "") -> str:
        """The judge's reply to ``prompt`` (temperature 0), from the cache when it was asked before."""
        return self.complete_many([prompt], system)[0]

    def complete_many(self, prompts: Sequence[str], system: str = "") -> list[str]:
        """Replies to every prompt, in order; only prompts missing from the cache are sent (once each)."""
        keys = [cache_key(self.model, system, p) for p in prompts]
        todo = list(dict.fromkeys(p for p, k in zip(prompts, keys, strict=True) if k not in self._cache))
        step = self.chunk_size if self.backend is not None else 1
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            if self.backend is not None:
                replies = self.backend(chunk, system, self.max_tokens)
                self.requests_sent += len(chunk)
            else:
                replies = [self._request(chunk[0], system)]
            for prompt, reply in zip(chunk, replies, strict=True):
                self._cache[cache_key(self.model, system, prompt)] = reply
            self._save()
        return [self._cache[k] for k in keys]

    def _request(self, prompt: str, system: str) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.requests_sent += 1
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500:
                    raise JudgeError(f"judge refused the request: HTTP {err.code}") from err
                last_error = err
            except (urllib.error.URLError, TimeoutError) as err:
                last_error = err
        raise JudgeError(f"no verdict after {self.max_retries + 1} attempts") from last_error

    def _save(self) -> None:
        if not self.cache_path or not self.write_cache:
            return
        path = Path(self.cache_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self._cache, indent=1))
        os.replace(tmp, path)


def fiubench_gpt_scores(client: JudgeClient, rows: Sequence[tuple[str, str, str]],
                        prompt: JudgePrompt | None = None) -> tuple[list[float], int]:
    """FIUBench GPT scores in [0, 1] of (question, answer, prediction) rows, and how many verdicts had no
    number (scored 0.0, as the original). Predictions of 5 characters or fewer score 0.0 with no request."""
    prompt = prompt or default_prompt("fiubench")
    asked = [i for i, (_, _, pred) in enumerate(rows) if len(pred) > 5]
    texts = client.complete_many([prompt.format(question=rows[i][0], answer=rows[i][1], prediction=rows[i][2])
                                  for i in asked], prompt.system)
    scores, unparsed = [0.0] * len(rows), 0
    for i, text in zip(asked, texts, strict=True):
        value = parse_fiubench_score_or_none(text)
        unparsed += value is None
        scores[i] = 0.0 if value is None else value
    return scores, unparsed


def fiubench_gpt_score(client: JudgeClient, question: str, answer: str, prediction: str) -> float:
    """FIUBench GPT score in [0, 1] of one prediction (0.0 for predictions of 5 characters or fewer)."""
    return fiubench_gpt_scores(client, [(question, answer, prediction)])[0][0]


def mllmu_factuality_scores(client: JudgeClient, rows: Sequence[Mapping[str, str]],
                            prompt: JudgePrompt | None = None,
                            task_type: str = "generation") -> tuple[list[int | None], list[str]]:
    """Factuality 1..10 (None when unparsable) and the verdict text of eval.py generation rows
    (``image_id``, ``question``, ``generated_answer``, ``ground_truth``); ``{task_type}`` is filled capitalised
    ("Generation"), as eval_gpt.py writes it."""
    prompt = prompt or default_prompt("mllmu")
    texts = client.complete_many([prompt.format(task_type=task_type.capitalize(), image_id=r["image_id"],
                                                question=r["question"], generated_answer=r["generated_answer"],
                                                ground_truth=r["ground_truth"]) for r in rows], prompt.system)
    return [parse_mllmu_factuality(t) for t in texts], texts


def mllmu_factuality(client: JudgeClient, image_id: str, question: str, generated_answer: str,
                     ground_truth: str, task_type: str = "generation") -> int | None:
    """MLLMU-Bench factuality score 1..10 of one generation (None when the verdict is unparsable)."""
    row = {"image_id": image_id, "question": question, "generated_answer": generated_answer,
           "ground_truth": ground_truth}
    return mllmu_factuality_scores(client, [row], task_type=task_type)[0][0]
