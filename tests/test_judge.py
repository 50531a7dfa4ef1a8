"""Pairwise judge: verdict parsing, order combination, the OpenAI-compatible endpoint judge against a
local http.server (request shape, auth header, both orders, retries on 500, errors), and a local-model
judge run end to end on a tiny random model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lidr_jax.eval.judge import (
    EndpointJudge,
    JudgeRequestError,
    JudgeUnreachableError,
    combine,
    head_to_head,
    judge_messages,
    parse_verdict,
)


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("Output (a)", "a"),
        ("Output (b)", "b"),
        ("**Output (b)**", "b"),
        ("output b.", "b"),
        ("(a)", "a"),
        ("b", "b"),
        ("Output [a]", "a"),
        ("I prefer Output (a) because it is more detailed.", "a"),
        ("Comparing Output (a) with Output (b), Output (b) is better.", "b"),
        ("Both outputs are equally bad.", None),
        ("Output (a) and Output (b) are tied.", None),
        ("", None),
        ("abstain", None),
    ],
)
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


def test_combine_both_orders():
    assert combine("a", "b") == "win"  # both orders prefer model 1
    assert combine("b", "a") == "lose"
    assert combine("a", "a") == "tie"  # position bias: the orders disagree
    assert combine("b", "b") == "tie"
    assert combine(None, "b") == "tie"


class _ChatServer:
    """A chat-completions server on 127.0.0.1 (port 0). The judge "prefers" whichever output contains
    the word GOOD; the first `fail_first` requests get HTTP 500."""

    def __init__(self, fail_first: int = 0, status: int = 500):
        self.requests: list[dict] = []
        self.fail_left = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(dict(path=self.path, auth=self.headers.get("Authorization"), body=body))
                if outer.fail_left > 0:
                    outer.fail_left -= 1
                    self.send_response(status)
                    self.end_headers()
                    self.wfile.write(b'{"error": "try again"}')
                    return
                prompt = body["messages"][-1]["content"]
                a = prompt.split("## Output (a)")[1].split("## Output (b)")[0]
                verdict = "Output (a)" if "GOOD" in a else "**Output (b)**"
                reply = {"choices": [{"message": {"role": "assistant", "content": verdict}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_endpoint_judge_head_to_head(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    with _ChatServer() as srv:
        judge = EndpointJudge(srv.url, "judge-model", api_key_env="MY_JUDGE_KEY", backoff_s=0.01, concurrency=2)
        res = head_to_head(
            ["instr 1", "instr 2", "instr 3"],
            ["GOOD one", "meh", "GOOD too"],  # model 1
            ["meh", "GOOD two", "GOOD also"],  # model 2
            judge,
        )
    assert (res["win"], res["tie"], res["lose"], res["n"]) == (1, 1, 1, 3)
    assert res["win_rate"] == pytest.approx(0.5)
    assert [r["outcome"] for r in res["records"]] == ["win", "lose", "tie"]
    assert [(r["verdict_12"], r["verdict_21"]) for r in res["records"]] == [("a", "b"), ("b", "a"), ("a", "a")]
    assert len(srv.requests) == 6  # every pair judged in both orders
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test-123"
    assert req["body"]["model"] == "judge-model"
    assert req["body"]["temperature"] == 0.0
    assert [m["role"] for m in req["body"]["messages"]] == ["system", "user"]
    contents = sorted(r["body"]["messages"][-1]["content"] for r in srv.requests)
    expected = sorted(
        judge_messages(x, o1, o2)[-1]["content"]
        for x, a, b in [
            ("instr 1", "GOOD one", "meh"),
            ("instr 2", "meh", "GOOD two"),
            ("instr 3", "GOOD too", "GOOD also"),
        ]
        for o1, o2 in [(a, b), (b, a)]
    )
    assert contents == expected


def test_endpoint_retries_on_500(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "k")
    with _ChatServer(fail_first=2) as srv:
        judge = EndpointJudge(srv.url + "/chat/completions", "m", api_key_env="MY_JUDGE_KEY", backoff_s=0.01)
        reply = judge.complete_one(judge_messages("x", "GOOD", "bad"))
    assert reply == "Output (a)"
    assert len(srv.requests) == 3  # two 500s, then the answer
    assert srv.requests[-1]["path"] == "/v1/chat/completions"


def test_endpoint_gives_up_after_retries(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "k")
    with _ChatServer(fail_first=100) as srv:
        judge = EndpointJudge(srv.url, "m", api_key_env="MY_JUDGE_KEY", backoff_s=0.01, max_retries=2)
        with pytest.raises(JudgeUnreachableError, match=r"did not answer after 3 tries \(last error: HTTP 500"):
            judge.complete_one(judge_messages("x", "a", "b"))
        assert len(srv.requests) == 3


def test_endpoint_client_error_is_not_retried(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "wrong-key")
    with _ChatServer(fail_first=100, status=401) as srv:
        judge = EndpointJudge(srv.url, "m", api_key_env="MY_JUDGE_KEY", backoff_s=0.01)
        with pytest.raises(JudgeRequestError, match="refused the request: HTTP 401") as err:
            judge.complete_one(judge_messages("x", "a", "b"))
        assert "wrong-key" not in str(err.value)  # the key is never echoed
        assert len(srv.requests) == 1


def test_endpoint_unreachable_and_missing_key(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MY_JUDGE_KEY", "k")
    judge = EndpointJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env="MY_JUDGE_KEY", backoff_s=0.01, max_retries=1)
    with pytest.raises(JudgeUnreachableError, match=rf"127.0.0.1:{port}/v1/chat/completions did not answer after 2"):
        judge.complete_one(judge_messages("x", "a", "b"))
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(JudgeRequestError, match="variable MY_JUDGE_KEY is not set"):
        judge.complete_one(judge_messages("x", "a", "b"))


def test_head_to_head_needs_aligned_lists():
    with pytest.raises(ValueError, match="2 instructions, 2 and 1 outputs"):
        head_to_head(["a", "b"], ["x", "y"], ["z"], judge=None)


def test_local_judge_end_to_end(tiny_random_model):
    """A tiny random model judges two pairs (verdicts are noise; the plumbing is what is tested)."""
    from lidr_jax.eval.judge import LocalJudge

    judge = LocalJudge(tiny_random_model, max_new_tokens=4, batch_size=4)
    res = head_to_head(["Say hi.", "Count to 3."], ["hi", "1 2 3"], ["hello", "one two"], judge)
    assert res["n"] == 2 and res["win"] + res["tie"] + res["lose"] == 2
    for r in res["records"]:
        assert isinstance(r["judge_12"], str) and isinstance(r["judge_21"], str)
        assert r["verdict_12"] in ("a", "b", None) and r["outcome"] in ("win", "tie", "lose")


@pytest.fixture(scope="module")
def tiny_random_model():
    from eval_helpers import tiny_random_model as build

    return build()
