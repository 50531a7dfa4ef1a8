"""lidr_jax.endpoint against a scripted OpenAI-compatible server on 127.0.0.1: request shape, key header,
retries (backoff, Retry-After, bounded total time), the on-disk cache, and the errors."""

import socket

import pytest
from chat_server import fake_time, serve

from lidr_jax.endpoint import (
    ChatClient,
    EndpointConfig,
    EndpointRequestError,
    EndpointUnreachableError,
    request_key,
    retry_after_seconds,
)


@pytest.fixture
def server():
    yield from serve()


def test_request_shape_key_header_and_cache(server, tmp_path, monkeypatch):
    srv = server()
    monkeypatch.setenv("MY_TEST_KEY", "sk-secret-123")
    cfg = EndpointConfig(url=srv.url, model="tiny-chat", api_key_env="MY_TEST_KEY")
    client = ChatClient(cfg, tmp_path / "cache")
    chat = [{"role": "user", "content": "hola"}]
    assert client.complete(chat, max_tokens=7, temperature=0.0) == "reply: hola"
    (req,) = srv.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-secret-123"
    assert req["body"] == {"model": "tiny-chat", "messages": chat, "max_tokens": 7, "temperature": 0.0}
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [request_key(req["body"]) + ".json"]
    assert "sk-secret-123" not in files[0].read_text()
    # A resumed stage (a new client on the same cache) sends nothing for a request already answered.
    again = ChatClient(cfg, tmp_path / "cache")
    assert again.complete(chat, max_tokens=7, temperature=0.0) == "reply: hola"
    assert again.requests_sent == 0 and len(srv.requests) == 1
    # A different decoding parameter is a different request.
    assert again.complete(chat, max_tokens=8, temperature=0.0) == "reply: hola"
    assert len(srv.requests) == 2
    out = again.complete_many([[{"role": "user", "content": str(i)}] for i in range(5)], max_tokens=7)
    assert out == [f"reply: {i}" for i in range(5)]
    # equal requests in one call are sent once, even when they would be in flight together
    sent = len(srv.requests)
    chats = [[{"role": "user", "content": c}] for c in "xyxyxx"]
    assert again.complete_many(chats, max_tokens=7) == [f"reply: {c}" for c in "xyxyxx"]
    assert len(srv.requests) == sent + 2


def test_missing_key_variable_names_it_not_the_key(server, monkeypatch):
    srv = server()
    monkeypatch.delenv("ABSENT_KEY_VAR", raising=False)
    client = ChatClient(EndpointConfig(url=srv.url, model="m", api_key_env="ABSENT_KEY_VAR"))
    with pytest.raises(
        EndpointRequestError, match=r"variable ABSENT_KEY_VAR for http://127.0.0.1:\d+/v1/chat/completions is not set"
    ):
        client.complete([{"role": "user", "content": "x"}])
    assert srv.requests == []


def test_no_key_sends_no_authorization(server):
    srv = server()
    ChatClient(EndpointConfig(url=srv.url + "/chat/completions", model="m", api_key_env="")).complete(
        [{"role": "user", "content": "x"}]
    )
    assert "Authorization" not in srv.requests[0]["headers"]


def test_backoff_and_retry_after(server):
    err = {"error": "busy"}
    srv = server([(503, {}, err), (429, {"Retry-After": "7"}, err), (500, {}, err), "echo"])
    sleep, clock, waits = fake_time()
    cfg = EndpointConfig(url=srv.url, model="m", api_key_env="", backoff_s=0.5, max_backoff_s=60)
    client = ChatClient(cfg, sleep=sleep, clock=clock)
    assert client.complete([{"role": "user", "content": "q"}]) == "reply: q"
    # retry 0: backoff 0.5; retry 1: Retry-After 7 replaces 1.0; retry 2: backoff 0.5 * 4 = 2.0
    assert waits == [0.5, 7.0, 2.0]
    assert client.requests_sent == 4


def test_total_retry_time_is_bounded(server):
    srv = server([(503, {}, {})] * 10)
    sleep, clock, waits = fake_time()
    cfg = EndpointConfig(url=srv.url, model="m", api_key_env="", backoff_s=1.0, max_retries=10, max_retry_time_s=5)
    with pytest.raises(EndpointUnreachableError, match=r"did not answer after 3 tries .*HTTP 503"):
        ChatClient(cfg, sleep=sleep, clock=clock).complete([{"role": "user", "content": "q"}])
    assert waits == [1.0, 2.0]  # the next wait (4 s) would end after 7 s > 5 s


def test_client_error_is_not_retried(server):
    srv = server([(400, {}, {"error": "bad model"})])
    with pytest.raises(EndpointRequestError, match=r"refused the request: HTTP 400: .*bad model"):
        ChatClient(EndpointConfig(url=srv.url, model="m", api_key_env="")).complete([{"role": "user", "content": "q"}])
    assert len(srv.requests) == 1


def test_not_a_chat_completion(server):
    srv = server([(200, {}, {"text": "hi"})])
    with pytest.raises(EndpointRequestError, match="without choices"):
        ChatClient(EndpointConfig(url=srv.url, model="m", api_key_env="")).complete([{"role": "user", "content": "q"}])


def test_unreachable_names_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    sleep, clock, waits = fake_time()
    cfg = EndpointConfig(url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env="", max_retries=2)
    with pytest.raises(EndpointUnreachableError, match=rf"endpoint http://127.0.0.1:{port}/v1/chat/completions did"):
        ChatClient(cfg, sleep=sleep, clock=clock).complete([{"role": "user", "content": "q"}])
    assert waits == [1.0, 2.0]


def test_retry_after_forms():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
