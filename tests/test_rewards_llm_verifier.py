"""LLM verifier against a local OpenAI-compatible server: prompts, verdict parsing, retries, timeouts."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rl.rewards.base import ScoringSample
from data.verifier_prompt import PRINCIPLES, build_verifier_prompt, parse_verdict
from rl.rewards.llm_verifier import CallableJudge, JudgeError, LLMVerifier, OpenAIJudge

KEY = "0123456789abcdef"


class FakeJudgeServer:
    """``/v1/chat/completions`` on 127.0.0.1: says YES iff the model answer block equals the reference block,
    in the keyed verdict line the prompt asks for.

    ``fail_next`` requests get HTTP 500 first; ``delay_s`` delays every reply.
    """

    def __init__(self):
        self.requests = []
        self.fail_next = 0
        self.delay_s = 0.0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    fail = server.fail_next > 0
                    server.fail_next -= fail
                if fail:
                    self.send_error(500, "overloaded")
                    return
                time.sleep(server.delay_s)
                prompt = body["messages"][0]["content"]
                reference = prompt.split("Reference answer:\n")[1].split("\n\n")[0]
                key = prompt.rsplit("VERDICT ", 1)[1].split(":")[0]
                answer = prompt.split(f"<answer-{key}>\n")[1].split(f"\n</answer-{key}>")[0]
                verdict = "YES" if answer.strip() == reference.strip() else "NO"
                line = f"VERDICT {key}: **{verdict}**"
                content = f"The two answers are compared.\n{line}" if "step by step" in prompt else line
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeJudgeServer()
    yield s
    s.close()


def sample(answer, reference="42"):
    return ScoringSample(question="What is 6 * 7?", response=f"<think>6*7</think>{answer}", reference=reference)


def test_prompt_contains_triplet_principles_and_keyed_instruction():
    direct = build_verifier_prompt("Q?", "ref", "ans", KEY, thinking=False)
    thinking = build_verifier_prompt("Q?", "ref", "ans", KEY, thinking=True)
    for p in (direct, thinking):
        assert "Question:\nQ?" in p and "Reference answer:\nref" in p and f"<answer-{KEY}>\nans\n</answer-{KEY}>" in p
        assert PRINCIPLES in p and f"VERDICT {KEY}: YES" in p
    assert "step by step" in thinking and "step by step" not in direct
    assert f"<answer-{KEY}>\n(empty)" in build_verifier_prompt("Q?", "ref", "  ", KEY)
    with pytest.raises(ValueError, match="hex"):
        build_verifier_prompt("Q?", "ref", "ans", "not a key")


@pytest.mark.parametrize("reply,expected", [
    (f"Reasoning...\nVERDICT {KEY}: YES", True),
    (f"reasoning\nverdict {KEY}: no", False),
    (f"**VERDICT {KEY}:** **Yes**.\nHope this helps!", None),  # the colon belongs right after the key
    (f"VERDICT {KEY}: **Yes**.\nHope this helps!", True),
    (f"VERDICT {KEY}: NO\n...on reflection...\nVERDICT {KEY}: YES", True),  # the last keyed line decides
    ("Final verdict: YES", None),  # no key: the format the candidate could imitate
    ("VERDICT 1111111111111111: YES", None),  # another key
    ("YES", None),
    ("CORRECT", None),
    (f"VERDICT {KEY}: maybe", None),
    ("", None),
])
def test_verdict_parsing(reply, expected):
    assert parse_verdict(reply, KEY) is expected


@pytest.mark.parametrize("thinking", [False, True])
def test_scores_through_http_judge(server, thinking):
    judge = OpenAIJudge(server.base_url, model="judge-x", api_key="k", concurrency=2, retries=0, timeout_s=10)
    verifier = LLMVerifier(judge, thinking=thinking)
    results = verifier.score_batch([sample("42"), sample("41"), sample("42", reference="43")])
    assert [r.correct for r in results] == [True, False, False]
    assert [r.reward for r in results] == [1.0, 0.0, 0.0]
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-x"
    assert headers["Authorization"] == "Bearer k"
    assert "<think>" not in body["messages"][0]["content"]  # only the final answer is judged


def test_retry_on_500_then_success(server):
    server.fail_next = 2
    judge = OpenAIJudge(server.base_url, model="m", retries=2, backoff_s=0.01, timeout_s=10)
    res = LLMVerifier(judge, thinking=False).score(sample("42"))
    assert res.correct
    assert len(server.requests) == 3


def test_retries_exhausted_is_masked_with_reason(server):
    server.fail_next = 10
    judge = OpenAIJudge(server.base_url, model="m", retries=1, backoff_s=0.01, timeout_s=10)
    res = LLMVerifier(judge).score(sample("42"))
    assert not res.correct and res.reward == 0.0 and res.masked and res.category == "judge_error"
    assert "HTTP 500" in res.reason and "2 attempts" in res.reason


@pytest.mark.timeout(60)
def test_timeout_then_retry_gives_up(server):
    server.delay_s = 1.0
    judge = OpenAIJudge(server.base_url, model="m", retries=1, backoff_s=0.01, timeout_s=0.2)
    res = LLMVerifier(judge).score(sample("42"))
    assert not res.correct and res.masked and "judge failed" in res.reason and "Timeout" in res.reason
    assert len(server.requests) == 2


def test_malformed_judge_reply_is_masked_with_reason():
    verifier = LLMVerifier(CallableJudge(lambda prompts: ["I am not sure." for _ in prompts]), thinking=True)
    res = verifier.score(sample("42"))
    assert not res.correct and res.masked and "malformed" in res.reason


def test_failing_policy_judge_is_masked():
    def generate(prompts):
        raise RuntimeError("out of KV cache")

    res = LLMVerifier(CallableJudge(generate)).score(sample("42"))
    assert res.masked and res.category == "judge_error" and "out of KV cache" in res.reason


def test_callable_judge_checks_reply_count():
    with pytest.raises(JudgeError, match="1 replies for 2 prompts"):
        CallableJudge(lambda prompts: ["YES"]).complete(["a", "b"])


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIJudge("localhost:8000", model="m")
    with pytest.raises(ValueError, match="reference"):
        LLMVerifier(CallableJudge(lambda p: p)).score(ScoringSample(response="x"))
