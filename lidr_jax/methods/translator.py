"""Who translates in LIDR: the policy itself (the paper), another model, or an OpenAI-compatible server.

docs/method.md 1.3: the paper's model translates its own answers. A small model's self-translation often
copies the English text (lidr_jax.methods.filters counts those), and for low-resource languages the
authors themselves trained a variant whose translations came from an external system. So:

- `kind: policy` (default): the model being trained translates, with the translation request of
  lidr_jax.methods.lidr.TranslationPrompt, its prefill, and `lidr.translation` decoding.
- `kind: model`: another model (an HF directory, a `.gguf` file, or an embedded name) translates.
  The pipeline loads it for the translate stage only and releases the policy while it runs, so one
  model is resident at a time.
- `kind: endpoint`: an OpenAI-compatible `/chat/completions` server (lidr_jax.endpoint, the project's one
  HTTP client: retries, `Retry-After`, the key from a named environment variable, every answer cached
  in the stage directory so a resumed stage never asks twice). A chat API cannot pre-fill the
  assistant turn, so the request is sent without the prefill and the reply is parsed from its first
  opening tag (`parse_translation(prefilled=False)`).

Every pair records which translator made its chosen answer (`TranslatorConfig.name`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lidr_jax.endpoint import ChatClient, EndpointConfig
from lidr_jax.methods.lidr import Message, TranslationPrompt, parse_translation
from lidr_jax.sampling.sampler import SamplingConfig
from lidr_jax.settings import check_settings, setting


@dataclasses.dataclass(frozen=True)
class TranslatorConfig:
    """LIDR's translator (module docstring). `model` for kind "model"; `endpoint` for kind "endpoint"
    (url, model name, api_key_env: the NAME of the variable holding the key, never the key)."""

    kind: Literal["policy", "model", "endpoint"] = setting(
        "policy", "policy: the model being trained (the paper) | model: another model | endpoint: an HTTP server"
    )
    model: str | None = setting(None, "kind model: an HF directory, .gguf file or embedded model name")
    endpoint: EndpointConfig = setting(EndpointConfig(), "kind endpoint: an OpenAI-compatible server")

    def __post_init__(self):
        check_settings(self)
        if self.kind == "model" and not self.model:
            raise ValueError("translator kind 'model' needs translator.model (an HF directory, .gguf file or name)")
        if self.kind == "endpoint" and not (self.endpoint.url and self.endpoint.model):
            raise ValueError("translator kind 'endpoint' needs translator.endpoint.url and translator.endpoint.model")

    @property
    def name(self) -> str:
        """The translator as pair provenance names it: "policy", "model:<spec>", "endpoint:<model>@<url>"."""
        if self.kind == "model":
            return f"model:{self.model}"
        if self.kind == "endpoint":
            return f"endpoint:{self.endpoint.model}@{self.endpoint.shown_url}"
        return "policy"


def endpoint_params(sampling: SamplingConfig) -> dict:
    """Chat-completions decoding parameters from a sampling config: max_tokens, temperature, and top_p
    when it is below 1. (Repetition penalty has no OpenAI-API field; the translation default is 1.0.)"""
    params = {"max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature}
    if sampling.top_p < 1.0:
        params["top_p"] = sampling.top_p
    return params


def endpoint_translate(
    config: TranslatorConfig,
    requests: Sequence[tuple[list[Message], str]],
    sampling: SamplingConfig,
    cache_dir: str | Path,
    client: ChatClient | None = None,
) -> list[str]:
    """The server's raw reply to each (messages, prefill) translation request (the prefill is not
    sent: module docstring), answers cached under `cache_dir`."""
    client = client or ChatClient(config.endpoint, cache_dir)
    return client.complete_many([messages for messages, _ in requests], **endpoint_params(sampling))


def parse_reply(text: str, prompt: TranslationPrompt, config: TranslatorConfig) -> str | None:
    """The translation in a translator's output: after the prefill for the policy and a model, from the
    first opening tag for an endpoint (lidr_jax.methods.lidr.parse_translation)."""
    return parse_translation(text, prompt, prefilled=config.kind != "endpoint" and bool(prompt.prefill))
