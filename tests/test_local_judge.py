"""The local judge: verdicts generated in batches by our KV-cache generator from a checkpoint the project exported,
parsed and cached like the HTTP judge's; MLLMU factuality and judge prompt files through the same machinery."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.judge_models import constant_judge
from tests.test_judge import server_factory  # noqa: F401 (fixture)
from vlmu_jax.eval import batched, judge
from vlmu_jax.eval.local_judge import local_judge
from vlmu_jax.eval.tasks.mllmu import add_factuality


def _rows(n: int) -> list[dict]:
    return [{"image_id": str(i), "question": f"What is the job of person {i}?", "generated_answer": f"A pilot {i}",
             "ground_truth": f"She is a pilot {i}"} for i in range(n)]


@pytest.fixture(scope="module")
def judge_path(tmp_path_factory):
    return constant_judge(tmp_path_factory.mktemp("judge"))


def test_local_judge_batches_parses_and_caches(judge_path, tmp_path, monkeypatch):
    calls = []
    real = batched.generate

    def spy(model, input_ids, *args, **kwargs):
        calls.append(np.shape(input_ids)[0])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(batched, "generate", spy)
    cache = tmp_path / "judge_cache.json"
    client = local_judge(judge_path, template="llava-1.5", batch_size=4, max_tokens=2, cache_path=str(cache))
    rows = _rows(5)
    scores, verdicts = judge.mllmu_factuality_scores(client, rows + rows[:2])  # 2 repeats: asked once
    assert calls == [4, 4]  # 5 distinct prompts -> two batches of 4 (the last wraps)
    assert client.requests_sent == 5
    assert verdicts[0].splitlines() == ["Factuality Score: 7", "Factuality Score: 7"]
    assert scores == [7] * 7
    fiu, unparsed = judge.fiubench_gpt_scores(client, [("Where?", "Paris", "She lives in Paris."), ("Q", "A", "ok")])
    assert fiu == [7.0, 0.0] and unparsed == 0 and calls == [4, 4, 4]  # "ok": too short, never asked
    stored = json.loads(cache.read_text())
    assert len(stored) == 6 and all(v.startswith("Factuality Score: 7") for v in stored.values())

    calls.clear()
    rerun = local_judge(judge_path, template="llava-1.5", batch_size=4, max_tokens=2, cache_path=str(cache))
    assert judge.mllmu_factuality_scores(rerun, rows)[0] == [7] * 5
    assert calls == [] and rerun.requests_sent == 0  # every verdict from the cache
    assert rerun.model == f"local:{judge_path.absolute()}"


def test_factuality_per_set_counts_unparsed(server_factory):  # noqa: F811
    verdict = '{{\n"Factuality Score": {},\n"Justification": "x"\n}}'
    srv = server_factory([verdict.format(8), "I cannot rate this.", verdict.format(4), verdict.format("ten")])
    client = judge.JudgeClient(srv.url, "m", timeout_s=5)
    results = {"Forget Set Results": {"predictions": {"generation": _rows(2)}},
               "Test Set Results": {"predictions": {"generation": _rows(4)[2:]}}}
    add_factuality(results, client)
    forget, test = (results[k]["factuality"] for k in ("Forget Set Results", "Test Set Results"))
    assert forget == {"Average Generation Factuality Score": 8.0, "Judged": 2, "Unparsed Verdicts": 1}
    assert test == {"Average Generation Factuality Score": 4.0, "Judged": 2, "Unparsed Verdicts": 1}
    rows = results["Forget Set Results"]["predictions"]["generation"]
    assert [r["Factuality Score"] for r in rows] == [8, None] and rows[1]["Factuality Verdict"] == "I cannot rate this."
    assert srv.bodies[0]["messages"][0] == {"role": "system", "content": judge.MLLMU_SYSTEM}
    none = {"X": {"predictions": {"generation": _rows(1)}}}
    add_factuality(none, judge.JudgeClient(server_factory(["no score"]).url, "m", timeout_s=5))
    assert none["X"]["factuality"]["Average Generation Factuality Score"] is None  # never a silent 0


def test_prompt_files_replace_our_wording(server_factory, tmp_path):  # noqa: F811
    user, system = tmp_path / "user.txt", tmp_path / "system.txt"
    user.write_text("Task {task_type}. Q: {question} A: {generated_answer} GT: {ground_truth} {{json}}")
    system.write_text("You are a strict grader.\n")
    prompt = judge.load_prompt("mllmu", str(user), str(system))
    srv = server_factory(['"Factuality Score": 9'])
    scores, _ = judge.mllmu_factuality_scores(judge.JudgeClient(srv.url, "m", timeout_s=5), _rows(1), prompt)
    assert scores == [9]
    messages = srv.bodies[0]["messages"]
    assert messages[0]["content"] == "You are a strict grader."
    assert messages[1]["content"] == ("Task Generation. Q: What is the job of person 0? A: A pilot 0 "
                                      "GT: She is a pilot 0 {json}")
    user.write_text("Q: {question} A: {generated_answer}")
    with pytest.raises(ValueError, match="missing placeholder.*ground_truth"):
        judge.load_prompt("mllmu", str(user))
    user.write_text("Q: {question} {answer} {prediction} {score}")
    with pytest.raises(ValueError, match="bad placeholder 'score'"):
        judge.load_prompt("fiubench", str(user))
