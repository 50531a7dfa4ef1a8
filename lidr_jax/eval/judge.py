"""Pairwise judging for head-to-head comparisons (model 1 vs model 2 on the same instructions).

A judge is anything with `complete(chats: list[list[message]]) -> list[str]`. Two are provided:
- `LocalJudge`: a model loaded with lidr_jax, greedy decoding.
- `EndpointJudge`: an OpenAI-compatible chat-completions HTTP endpoint, standard library only
  (urllib). The API key is read from the environment variable whose NAME is a setting, sent as a
  Bearer token and never logged; 5xx, 429 and connection errors are retried with exponential backoff;
  an endpoint still unreachable after the last try raises `JudgeUnreachableError` naming the URL.

Each pair is judged twice, once in each order, to cancel position bias: model 1 wins only when both
orders prefer it, loses only when both prefer model 2, and ties otherwise (the orders disagree, or a
verdict could not be parsed). The prompt is AlpacaEval-style, in our own words.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

Message = dict[str, str]

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

    def complete(self, chats):
        from lidr_jax.generate.sampler import SamplingConfig, generate

        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, progress=False)
        return [r.text for r in generate(self.model, [list(c) for c in chats], sampling)]


class JudgeUnreachableError(ConnectionError):
    """The judge endpoint did not answer after every retry."""


class JudgeRequestError(RuntimeError):
    """The judge endpoint refused the request (a 4xx other than 429): retrying would not help."""


@dataclasses.dataclass
class EndpointJudge:
    """An OpenAI-compatible `/chat/completions` endpoint.

    `base_url` is e.g. "http://localhost:8000/v1" (or the full ".../chat/completions" URL).
    `api_key_env` is the NAME of the environment variable holding the key ("" = send no key).
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = 16
    temperature: float = 0.0
    timeout_s: float = 60.0
    max_retries: int = 5  # tries after the first
    backoff_s: float = 1.0  # wait before retry k is backoff_s * 2**k
    concurrency: int = 4

    @property
    def url(self) -> str:
        url = self.base_url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise JudgeRequestError(
                    f"the judge API key variable {self.api_key_env} is not set; export it, or set the key "
                    "variable name to an empty string for an endpoint that needs no key"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete_one(self, messages: Sequence[Message]) -> str:
        body = json.dumps(
            dict(model=self.model, messages=list(messages), max_tokens=self.max_tokens, temperature=self.temperature)
        ).encode()
        headers = self._headers()
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return payload["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code >= 500 or e.code == 429:
                    last_error = f"HTTP {e.code}: {detail}"
                    continue
                raise JudgeRequestError(
                    f"judge endpoint {self.url} refused the request: HTTP {e.code}: {detail}"
                ) from e
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise JudgeRequestError(
                    f"judge endpoint {self.url} answered without choices[0].message.content ({e!r}); "
                    "is it an OpenAI-compatible chat-completions endpoint?"
                ) from e
        raise JudgeUnreachableError(
            f"judge endpoint {self.url} did not answer after {self.max_retries + 1} tries (last error: "
            f"{last_error}); check the base URL and that the server is running"
        )

    def complete(self, chats):
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(self.complete_one, chats))


def head_to_head(instructions: Sequence[str], outputs_1: Sequence[str], outputs_2: Sequence[str], judge: Judge) -> dict:
    """Judge model 1 against model 2 on aligned lists, both orders.

    Returns {"win", "tie", "lose" (counts for model 1), "n", "win_rate" ((win + tie/2) / n),
    "records": [{instruction, output_1, output_2, judge_12, judge_21, verdict_12, verdict_21, outcome}]}.
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
    return dict(**counts, n=n, win_rate=(counts["win"] + counts["tie"] / 2) / n if n else 0.0, records=records)
