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

Difference: ``evaluate_util.get_all_evals`` builds the judge's question from ``input_strings[0]``, the FIRST
question of the split, for every item (the list grows across batches); we pass each item's own question.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

FIUBENCH_SYSTEM = ""
MLLMU_SYSTEM = "You judge how factually correct a generated response is."

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

MLLMU_PROMPT = """Rate the factuality of a generated {task_type} answer against its ground truth,
from 1 to 10:
10-9 fully correct with the same meaning (wording may differ);
8-7 mostly correct, minor details missing or off;
6-5 partly correct with a clear factual error or a notable omission;
4-3 major errors or crucial parts missing;
2-1 nonsensical, wrong or irrelevant.
Extra details help only when relevant and correct; irrelevant or excessive details lower the score.

Image ID: {image_id}
Question: {question}
Generated Answer: {generated_answer}
Ground Truth: {ground_truth}

Reply in this form:
{{
    "Factuality Score": <1-10>,
    "Justification": "<one short sentence>"
}}"""


class JudgeError(RuntimeError):
    """The endpoint did not give a verdict after all retries (or refused the request outright)."""


def parse_fiubench_score(text: str) -> float:
    """FIUBench score from a verdict: first line, after ':' if present, '**' stripped; 0.0 if not a number."""
    score = text.split("\n")[0].strip(" ")
    if ":" in score:
        score = score[score.find(":"):].strip(":").strip(" ")
    if "**" in score:
        score = score.strip("*").strip(" ")
    try:
        return float(score)
    except ValueError:
        return 0.0


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
    _cache: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.cache_path and Path(self.cache_path).exists():
            self._cache = json.loads(Path(self.cache_path).read_text())

    def complete(self, prompt: str, system: str = "") -> str:
        """The judge's reply to ``prompt`` (temperature 0), from the cache when it was asked before."""
        key = cache_key(self.model, system, prompt)
        if key not in self._cache:
            self._cache[key] = self._request(prompt, system)
            self._save()
        return self._cache[key]

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
        if not self.cache_path:
            return
        path = Path(self.cache_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self._cache, indent=1))
        os.replace(tmp, path)


def fiubench_gpt_score(client: JudgeClient, question: str, answer: str, prediction: str) -> float:
    """FIUBench GPT score in [0, 1] of one prediction (0.0 for predictions of 5 characters or fewer)."""
    if len(prediction) <= 5:
        return 0.0
    prompt = FIUBENCH_PROMPT.format(question=question, answer=answer, prediction=prediction)
    return parse_fiubench_score(client.complete(prompt, FIUBENCH_SYSTEM))


def mllmu_factuality(client: JudgeClient, image_id: str, question: str, generated_answer: str,
                     ground_truth: str, task_type: str = "generation") -> int | None:
    """MLLMU-Bench factuality score 1..10 of one generation (None when the verdict is unparsable)."""
    prompt = MLLMU_PROMPT.format(task_type=task_type, image_id=image_id, question=question,
                                 generated_answer=generated_answer, ground_truth=ground_truth)
    return parse_mllmu_factuality(client.complete(prompt, MLLMU_SYSTEM))
