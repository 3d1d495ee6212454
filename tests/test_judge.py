"""The judge against a real local HTTP server speaking the chat-completions protocol."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlmu_jax.eval import judge


class _Server:
    """Answers POST /v1/chat/completions; ``plan``: per-request behaviour ("500", "slow" or a reply)."""

    def __init__(self, plan):
        self.plan, self.bodies, self.auth = list(plan), [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                outer.auth.append(self.headers.get("Authorization"))
                action = outer.plan.pop(0) if outer.plan else "0.5"
                if action == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                if action == "slow":
                    time.sleep(0.6)
                    action = "0.5"
                message = {"role": "assistant", "content": action}
                data = json.dumps({"choices": [{"message": message}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(plan):
        servers.append(_Server(plan))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_parsers_follow_the_originals():
    assert judge.parse_fiubench_score("0.85\nkeywords: a, b\nexplanation") == 0.85
    assert judge.parse_fiubench_score("Score: 0.40\n...") == 0.40
    assert judge.parse_fiubench_score("**0.75**\n") == 0.75
    assert judge.parse_fiubench_score("I think it is fine") == 0.0
    assert judge.parse_mllmu_factuality('{\n "Factuality Score": 8,\n "Justification": "ok"\n}') == 8
    assert judge.parse_mllmu_factuality("no score") is None


def test_verdict_retry_after_500_and_cache_on_rerun(server_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    srv = server_factory(["500", "0.93\nParis\nmatches"])
    cache = tmp_path / "judge_cache.json"
    client = judge.JudgeClient(srv.url, "judge-model", api_key_env="TEST_JUDGE_KEY", cache_path=str(cache),
                               timeout_s=5, max_retries=2, backoff_s=0.01)
    score = judge.fiubench_gpt_score(client, "Where?", "In Paris.", "She lives in Paris.")
    assert score == 0.93
    assert len(srv.bodies) == 2 and client.requests_sent == 2
    body = srv.bodies[-1]
    assert body["model"] == "judge-model" and body["messages"][-1]["role"] == "user"
    assert "She lives in Paris." in body["messages"][-1]["content"]
    assert srv.auth[-1] == "Bearer sk-test"
    assert judge.fiubench_gpt_score(client, "Where?", "In Paris.", "ok") == 0.0  # <= 5 chars: no request
    rerun = judge.JudgeClient(srv.url, "judge-model", cache_path=str(cache), timeout_s=5)
    assert judge.fiubench_gpt_score(rerun, "Where?", "In Paris.", "She lives in Paris.") == 0.93
    assert len(srv.bodies) == 2 and rerun.requests_sent == 0
    other_model = judge.JudgeClient(srv.url, "other-model", cache_path=str(cache), timeout_s=5)
    judge.fiubench_gpt_score(other_model, "Where?", "In Paris.", "She lives in Paris.")
    assert len(srv.bodies) == 3


def test_timeout_retries_then_gives_up(server_factory):
    srv = server_factory(["slow", "slow"])
    client = judge.JudgeClient(srv.url, "m", timeout_s=0.2, max_retries=1, backoff_s=0.01)
    with pytest.raises(judge.JudgeError):
        client.complete("question")
    assert client.requests_sent == 2


def test_timeout_then_success(server_factory):
    srv = server_factory(["slow", '{\n"Factuality Score": 7,\n"Justification": "mostly"\n}'])
    client = judge.JudgeClient(srv.url, "m", timeout_s=0.2, max_retries=2, backoff_s=0.01)
    assert judge.mllmu_factuality(client, "12", "Job?", "A pilot", "She is a pilot") == 7
    assert client.requests_sent == 2


def test_gpt_scores_enter_the_log_and_model_utility(server_factory, tmp_path):
    from vlmu_jax.eval.tasks.fiubench import add_gpt_scores
    from vlmu_jax.report.aggregate import FORGET, RETAIN, fiubench_summary

    srv = server_factory(["0.8", "0.4"])
    client = judge.JudgeClient(srv.url, "judge-model", cache_path=str(tmp_path / "c.json"), timeout_s=5)
    log = {"generated_text": {"0": ["Who?", "This is Ada Lee.", "This is Ada Lee.", "name"],
                              "1": ["Where?", "Born in Oslo.", "Born in Lima.", "birthplace"]},
           "avg_gt_loss": {"0": 0.5, "1": 1.0}, "avg_paraphrased_loss": {"0": 1.0, "1": 1.0},
           "average_perturb_loss": {"0": [2.0, 2.0], "1": [1.5, 0.5]}, "rougeL_recall": {"0": 1.0, "1": 0.5}}
    add_gpt_scores(log, client)
    assert log["gpt"] == [0.8, 0.4]
    assert "Born in Oslo." in srv.bodies[1]["messages"][-1]["content"]
    row = fiubench_summary({FORGET: log, RETAIN: log})
    assert abs(row["GPT Retain"] - 0.6) < 1e-12
    retain_parts = [row["Prob. Retain"], row["Truth Ratio Retain"], row["ROUGE Retain"], row["GPT Retain"]]
    assert abs(row["Model Utility"] - len(retain_parts) / sum(1 / v for v in retain_parts)) < 1e-12
