"""Pairwise judging for head-to-head comparisons (model 1 vs model 2 on the same instructions).

A judge is anything with `complete(chats: list[list[message]]) -> list[str]`. Two are provided:
- `LocalJudge`: a model loaded with lidr_jax, greedy decoding.
- `EndpointJudge`: an OpenAI-compatible chat-completions endpoint through the project's one HTTP
  client (lidr_jax.endpoint: key from a named variable and never logged, retries with backoff,
  `Retry-After` honoured, bounded retry time, answers cached on disk as they arrive). `check()` fails
  in seconds when the endpoint cannot be reached, before anything is generated.

`head_to_head` records the judge (`describe()`: model and `PROMPT_VERSION`) with its results.

Each pair is judged twice, once in each order, to cancel position bias: model 1 wins only when both
orders prefer it, loses only when both prefer model 2, and ties otherwise (the orders disagree, or a
verdict could not be parsed). The prompt is AlpacaEval-style, in our own words.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from lidr_jax.endpoint import (
    ChatClient,
    EndpointConfig,
    EndpointRequestError,
    EndpointUnreachableError,
    check_reachable,
)
from lidr_jax.sampling.sampler import SamplingConfig, generate

Message = dict[str, str]
PROMPT_VERSION = "lidr_jax-pairwise-v1"  # change it with any change to JUDGE_SYSTEM or JUDGE_TEMPLATE

JUDGE_SYSTEM = (
    "You are a careful, impartial evaluator of AI assistants. You compare two responses to the same "
    "instruction and decide which one a thoughtful human would prefer."
)
JUDGE_TEMPLATE = """Which response follows the instruction better? Judge helpfulness, correctness, \
level of detail and whether the response is written in the language the instruction asks for \
(by default, the instruction's own language). Ignore the order in which the responses are shown and \
do not let length alone decide.

## Instruction
{instruction}

## Output (a)
{output_a}

## Output (b)
{output_b}

Reply with exactly one of these two lines and nothing else:
Output (a)
Output (b)"""

_LABEL_RE = re.compile(r"output\s*[\(\[]?\s*([ab])\s*[\)\]]?(?![a-z])", re.IGNORECASE)
_BARE_RE = re.compile(r"^\W*\(?\s*([ab])\s*\)?\W*$", re.IGNORECASE)
_PREFERENCE_RE = re.compile(
    r"(?:output\s*\(?\s*([ab])\s*\)?\s*(?:is|was)\s*(?:the\s*)?(?:better|preferred|superior|winner))"
    r"|(?:(?:better|preferred|prefer|winner|verdict|choose|choice)\W+(?:is\s*)?(?:output\s*)?"
    r"\(?\s*([ab])\s*\)?(?![a-z]))",
    re.IGNORECASE,
)


def judge_messages(instruction: str, output_a: str, output_b: str) -> list[Message]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": JUDGE_TEMPLATE.format(instruction=instruction, output_a=output_a, output_b=output_b),
        },
    ]


def parse_verdict(text: str) -> str | None:
    """ "a", "b", or None when the judge's reply names no clear winner.

    Accepts the requested "Output (a)" line with any decoration ("**Output (b)**", "Output b."),
    a bare "(a)" or "b", or a sentence that names one output only or says which one is better.
    """
    text = text.strip()
    bare = _BARE_RE.match(text)
    if bare:
        return bare.group(1).lower()
    labels = {m.group(1).lower() for m in _LABEL_RE.finditer(text)}
    if len(labels) == 1:
        return labels.pop()
    prefs = {(m.group(1) or m.group(2)).lower() for m in _PREFERENCE_RE.finditer(text)}
    if len(prefs) == 1:
        return prefs.pop()
    return None


def combine(verdict_12: str | None, verdict_21: str | None) -> str:
    """Model 1's outcome from the two orders: (a)=1,(b)=2 then (a)=2,(b)=1. "win", "lose" or "tie"."""
    if verdict_12 == "a" and verdict_21 == "b":
        return "win"
    if verdict_12 == "b" and verdict_21 == "a":
        return "lose"
    return "tie"


class Judge(Protocol):
    def complete(self, chats: Sequence[Sequence[Message]]) -> list[str]: ...


@dataclasses.dataclass
class LocalJudge:
    """A lidr_jax model as the judge (greedy). The verdict is short, so few new tokens suffice."""

    model: object
    max_new_tokens: int = 16
    batch_size: int = 16

    def describe(self) -> dict:
        """What judged: recorded with the results."""
        return dict(kind="local", model=str(getattr(self.model, "source", "model")), prompt_version=PROMPT_VERSION)

    def complete(self, chats):
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, progress=False)
        return [r.text for r in generate(self.model, [list(c) for c in chats], sampling)]


JudgeUnreachableError = EndpointUnreachableError  # the endpoint did not answer (or cannot be reached)
JudgeRequestError = EndpointRequestError  # the endpoint refused the request: retrying would not help


class EndpointJudge:
    """An OpenAI-compatible `/chat/completions` endpoint as the judge, through lidr_jax.endpoint.

    `base_url` is e.g. "http://localhost:8000/v1" (or the full ".../chat/completions" URL);
    `api_key_env` the NAME of the environment variable holding the key ("" = send no key). With
    `cache_dir`, every judgment is stored as it arrives, so a resumed run asks nothing twice.
    `Retry-After` is honoured and retrying stops after `max_retries` or `max_retry_time_s`; once one
    request gives up, every queued one fails at once instead of retrying in turn.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        *,
        cache_dir: str | os.PathLike | None = None,
        max_tokens: int = 16,
        temperature: float = 0.0,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_retry_time_s: float = 120.0,
        concurrency: int = 4,
    ):
        config = EndpointConfig(
            url=base_url,
            model=model,
            api_key_env=api_key_env,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_retry_time_s=max_retry_time_s,
            concurrency=concurrency,
        )
        self.client = ChatClient(config, cache_dir)
        self.params = dict(max_tokens=max_tokens, temperature=temperature)

    @property
    def url(self) -> str:
        return self.client.config.shown_url  # the password masked: it is printed and recorded

    def describe(self) -> dict:
        """What judged: recorded with the results."""
        return dict(kind="endpoint", model=self.client.config.model, url=self.url, prompt_version=PROMPT_VERSION)

    def check(self, timeout_s: float = 10.0) -> None:
        """Fail fast, before any generation or judging: the endpoint's host must accept a connection
        (a TCP connect, so nothing is billed) and the API key variable must be set."""
        check_reachable(self.client.config, "judge endpoint", timeout_s)

    def complete_one(self, messages: Sequence[Message]) -> str:
        return self.client.complete(messages, **self.params)

    def complete(self, chats: Sequence[Sequence[Message]]) -> list[str]:
        given_up = threading.Event()

        def one(messages):
            if given_up.is_set():
                raise EndpointUnreachableError(f"judge endpoint {self.url}: skipped after an earlier request gave up")
            try:
                return self.complete_one(messages)
            except EndpointUnreachableError:
                given_up.set()
                raise

        with ThreadPoolExecutor(max_workers=self.client.config.concurrency) as pool:
            futures = [pool.submit(one, c) for c in chats]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def head_to_head(instructions: Sequence[str], outputs_1: Sequence[str], outputs_2: Sequence[str], judge: Judge) -> dict:
    """Judge model 1 against model 2 on aligned lists, both orders.

    Returns {"win", "tie", "lose" (counts for model 1), "n", "win_rate" ((win + tie/2) / n), "judge"
    ({kind, model, prompt_version, ...}), "records": [{instruction, output_1, output_2, judge_12, judge_21,
    verdict_12, verdict_21, outcome}]}.
    """
    if not len(instructions) == len(outputs_1) == len(outputs_2):
        raise ValueError(
            f"head-to-head needs aligned lists: {len(instructions)} instructions, {len(outputs_1)} and "
            f"{len(outputs_2)} outputs"
        )
    chats = [judge_messages(x, o1, o2) for x, o1, o2 in zip(instructions, outputs_1, outputs_2)]
    chats += [judge_messages(x, o2, o1) for x, o1, o2 in zip(instructions, outputs_1, outputs_2)]
    replies = judge.complete(chats)
    n = len(instructions)
    records = []
    for i in range(n):
        v12, v21 = parse_verdict(replies[i]), parse_verdict(replies[n + i])
        records.append(
            dict(
                instruction=instructions[i],
                output_1=outputs_1[i],
                output_2=outputs_2[i],
                judge_12=replies[i],
                judge_21=replies[n + i],
                verdict_12=v12,
                verdict_21=v21,
                outcome=combine(v12, v21),
            )
        )
    counts = {k: sum(r["outcome"] == k for r in records) for k in ("win", "tie", "lose")}
    judged_by = judge.describe() if hasattr(judge, "describe") else dict(kind=type(judge).__name__)
    return dict(
        **counts,
        n=n,
        win_rate=(counts["win"] + counts["tie"] / 2) / n if n else 0.0,
        judge={"prompt_version": PROMPT_VERSION, **judged_by},
        records=records,
    )
