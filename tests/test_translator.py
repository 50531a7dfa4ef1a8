"""LIDR's translator choice: settings, provenance names, and the endpoint translator against a server on
127.0.0.1 (request shape, key header, the cache a resumed stage reads, an unreachable server)."""

import socket

import pytest
from chat_server import fake_time, serve

from lidr_jax.endpoint import ChatClient, EndpointConfig, EndpointUnreachableError
from lidr_jax.methods.lidr import TranslationPrompt, translation_request
from lidr_jax.methods.translator import TranslatorConfig, endpoint_params, endpoint_translate, parse_reply
from lidr_jax.sampling.sampler import SamplingConfig


@pytest.fixture
def server():
    yield from serve()


def test_settings_and_names():
    assert TranslatorConfig().name == "policy"
    assert TranslatorConfig(kind="model", model="smollm2-135m-instruct").name == "model:smollm2-135m-instruct"
    ep = EndpointConfig(url="http://127.0.0.1:9/v1", model="big-mt", api_key_env="MT_KEY")
    assert (
        TranslatorConfig(kind="endpoint", endpoint=ep).name == "endpoint:big-mt@http://127.0.0.1:9/v1/chat/completions"
    )
    with pytest.raises(ValueError, match="needs translator.model"):
        TranslatorConfig(kind="model")
    with pytest.raises(ValueError, match=r"needs translator.endpoint.url and translator.endpoint.model"):
        TranslatorConfig(kind="endpoint")
    with pytest.raises(ValueError, match=r"kind must be one of \['policy', 'model', 'endpoint'\], got 'google'"):
        TranslatorConfig(kind="google")
    assert endpoint_params(SamplingConfig(max_new_tokens=4096)) == {"max_tokens": 4096, "temperature": 0.0}
    assert endpoint_params(SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=0.9))["top_p"] == 0.9


def test_replies_are_parsed_from_the_first_opening_tag_for_an_endpoint():
    prompt = TranslationPrompt()
    endpoint = TranslatorConfig(kind="endpoint", endpoint=EndpointConfig(url="http://h/v1", model="m"))
    reply = "Sure, here it is:\n<translation>Hallo Welt</translation>"
    assert parse_reply(reply, prompt, endpoint) == "Hallo Welt"
    # after a prefill (policy, model) the text is already inside the result: a later tag is kept as text
    assert parse_reply(reply, prompt, TranslatorConfig()) == "Sure, here it is:\n<translation>Hallo Welt"
    assert parse_reply("Hallo Welt</translation>", prompt, TranslatorConfig()) == "Hallo Welt"
    assert parse_reply("Hallo Welt", prompt, endpoint) is None  # no closing tag: failed


def test_endpoint_translator_request_key_and_cache(server, tmp_path, monkeypatch):
    script = [
        (200, {}, {"choices": [{"message": {"content": f"<translation>Übersetzung {i}</translation>"}}]})
        for i in range(2)
    ]
    srv = server(script)
    monkeypatch.setenv("MT_KEY", "sk-translate")
    cfg = TranslatorConfig(kind="endpoint", endpoint=EndpointConfig(url=srv.url, model="mt", api_key_env="MT_KEY"))
    requests = [translation_request(text, "de") for text in ("Hello", "World")]
    sampling = SamplingConfig(max_new_tokens=4096, repetition_penalty=1.0)
    cache = tmp_path / "translate" / "endpoint_cache"
    replies = endpoint_translate(cfg, requests, sampling, cache, ChatClient(cfg.endpoint, cache, sleep=lambda s: None))
    assert sorted(parse_reply(r, TranslationPrompt(), cfg) for r in replies) == ["Übersetzung 0", "Übersetzung 1"]
    assert len(srv.requests) == 2
    for req in srv.requests:
        assert req["headers"]["Authorization"] == "Bearer sk-translate"
        body = req["body"]
        assert set(body) == {"model", "messages", "max_tokens", "temperature"}
        assert (body["model"], body["max_tokens"], body["temperature"]) == ("mt", 4096, 0.0)
        assert body["messages"][-1]["role"] == "user" and "into German" in body["messages"][-1]["content"]
        assert len(body["messages"]) == 1  # no prefilled assistant turn
    # a resumed stage: the same requests again, answered from the cache, nothing sent
    again = ChatClient(cfg.endpoint, cache)
    assert endpoint_translate(cfg, requests, sampling, cache, again) == replies
    assert again.requests_sent == 0 and len(srv.requests) == 2
    assert all("sk-translate" not in f.read_text() for f in cache.iterdir())


def test_unreachable_translator_names_the_url(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    cfg = TranslatorConfig(kind="endpoint", endpoint=EndpointConfig(url=url, model="mt", api_key_env="", max_retries=1))
    sleep, clock, _ = fake_time()
    client = ChatClient(cfg.endpoint, tmp_path, sleep=sleep, clock=clock)
    with pytest.raises(
        EndpointUnreachableError, match=rf"endpoint {url}/chat/completions did not answer after 2 tries"
    ):
        endpoint_translate(cfg, [translation_request("Hi", "fr")], SamplingConfig(), tmp_path, client)
