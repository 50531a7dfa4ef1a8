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

    def __init__(self, fail_first: int = 0, status: int = 500, retry_after: str | None = None):
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
                    if retry_after is not None:
                        self.send_header("Retry-After", retry_after)
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
        with pytest.raises(
            JudgeUnreachableError, match=r"did not answer after 3 tries in \d+ s \(last error: HTTP 500"
        ):
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
    with pytest.raises(JudgeRequestError, match="variable MY_JUDGE_KEY for .* is not set"):
        judge.complete_one(judge_messages("x", "a", "b"))
    with pytest.raises(JudgeRequestError, match="judge endpoint: the API key variable MY_JUDGE_KEY for .* is not set"):
        judge.check()


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


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judgments_are_cached_and_never_asked_twice(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-9")
    args = (["i1", "i2"], ["GOOD a", "b"], ["c", "GOOD d"])
    with _ChatServer() as srv:
        judge = EndpointJudge(srv.url, "judge-m", api_key_env="MY_JUDGE_KEY", cache_dir=tmp_path / "cache")
        first = head_to_head(*args, judge)
        assert len(srv.requests) == 4
        again = EndpointJudge(srv.url, "judge-m", api_key_env="MY_JUDGE_KEY", cache_dir=tmp_path / "cache")
        second = head_to_head(*args, again)
        assert len(srv.requests) == 4  # a resumed run re-asks nothing
    assert first == second
    assert first["judge"] == {
        "prompt_version": "lidr_jax-pairwise-v1",
        "kind": "endpoint",
        "model": "judge-m",
        "url": srv.url + "/chat/completions",
    }
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 4
    assert all("sk-secret-9" not in p.read_text() for p in cached)  # the key is never stored


def test_retry_after_is_honoured(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "k")
    waits = []
    with _ChatServer(fail_first=1, status=429, retry_after="7") as srv:
        judge = EndpointJudge(srv.url, "m", api_key_env="MY_JUDGE_KEY", backoff_s=0.01)
        judge.client._sleep = waits.append  # the client's sleep, replaced so the test does not wait
        assert judge.complete_one(judge_messages("x", "GOOD", "b")) == "Output (a)"
    assert waits == [7.0]


def test_unreachable_judge_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("MY_JUDGE_KEY", "k")
    port = _closed_port()
    judge = EndpointJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env="MY_JUDGE_KEY", backoff_s=0.05, max_retries=2)
    t0 = time.perf_counter()
    with pytest.raises(JudgeUnreachableError, match=rf"127.0.0.1:{port}/v1/chat/completions cannot be reached"):
        judge.check()
    assert time.perf_counter() - t0 < 5
    # while judging: once one request gives up, the queued ones fail at once instead of retrying in turn
    chats = [judge_messages(f"x{i}", "a", "b") for i in range(40)]
    t0 = time.perf_counter()
    with pytest.raises(JudgeUnreachableError):
        judge.complete(chats)
    assert judge.client.requests_sent <= 3 * judge.client.config.concurrency
    assert time.perf_counter() - t0 < 5


def test_head_to_head_command_checks_the_judge_before_generating(tmp_path, monkeypatch, capsys):
    from lidr_jax.eval import evaluate

    monkeypatch.setenv("MY_JUDGE_KEY", "k")
    loaded = []
    monkeypatch.setattr(evaluate, "_load", lambda path: loaded.append(path))
    monkeypatch.setattr(evaluate, "_check_model", lambda spec, flag: None)  # model names that are not paths
    (tmp_path / "en.json").write_text(json.dumps([{"instruction": "Say hi."}]))
    port = _closed_port()
    argv = [
        "head-to-head",
        "--model-1",
        "m1",
        "--model-2",
        "m2",
        "--data",
        str(tmp_path),
        "--langs",
        "en",
        "--judge-url",
        f"http://127.0.0.1:{port}/v1",
        "--judge-name",
        "j",
        "--api-key-env",
        "MY_JUDGE_KEY",
        "--out",
        str(tmp_path / "out"),
    ]
    assert evaluate.main(argv) == 2
    assert "cannot be reached" in capsys.readouterr().err
    assert loaded == []  # no model was loaded, nothing generated
    # a language without outputs is refused before anything else
    assert (
        evaluate.main(
            [
                "head-to-head",
                "--outputs-1",
                str(tmp_path),
                "--outputs-2",
                str(tmp_path),
                "--langs",
                "fr",
                "--judge-url",
                "http://127.0.0.1:1/v1",
                "--judge-name",
                "j",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "fr/model_outputs.json not found" in capsys.readouterr().err


def test_head_to_head_command_saves_results_with_the_judge(tmp_path, monkeypatch, capsys):
    from lidr_jax.eval import evaluate
    from lidr_jax.eval.evaluate import alpaca_records

    monkeypatch.setenv("MY_JUDGE_KEY", "k")
    for name, outs in (("a", ["GOOD 1", "x"]), ("b", ["y", "GOOD 2"])):
        for lang in ("es", "de"):
            p = tmp_path / name / lang / "model_outputs.json"
            p.parent.mkdir(parents=True)
            items = [{"instruction": f"{lang} q1"}, {"instruction": f"{lang} q2"}]
            p.write_text(json.dumps(alpaca_records(items, outs, name)))
    with _ChatServer() as srv:
        argv = [
            "head-to-head",
            "--outputs-1",
            str(tmp_path / "a"),
            "--outputs-2",
            str(tmp_path / "b"),
            "--langs",
            "es,de",
            "--judge-url",
            srv.url,
            "--judge-name",
            "jm",
            "--api-key-env",
            "MY_JUDGE_KEY",
            "--out",
            str(tmp_path / "out"),
        ]
        assert evaluate.main(argv) == 0
        assert len(srv.requests) == 8
        assert evaluate.main(argv) == 0  # rerun: every judgment comes from the cache
        assert len(srv.requests) == 8
    saved = json.loads((tmp_path / "out" / "head_to_head.json").read_text())
    assert set(saved["languages"]) == {"es", "de"}
    es = saved["languages"]["es"]
    assert (es["win"], es["lose"], es["tie"]) == (1, 1, 0)
    assert es["judge"]["model"] == "jm" and es["judge"]["prompt_version"] == "lidr_jax-pairwise-v1"
