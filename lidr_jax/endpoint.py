"""The one HTTP client of the project: chat completions from an OpenAI-compatible server.

Used by the judge (lidr_jax.eval.judge) and by LIDR's endpoint translator (lidr_jax.methods.translator).
Standard library only (urllib). What it promises:

- The API key is read from the environment variable whose NAME is a setting (`api_key_env`), sent as a
  Bearer token, and never logged, cached, or put in an error message ("" = an endpoint without a key).
- 429, 5xx, connection errors and timeouts are retried with exponential backoff (`backoff_s * 2**k`,
  at most `max_backoff_s` per wait); a `Retry-After` header (seconds or an HTTP date) replaces the
  backoff of that wait. Retrying stops after `max_retries` retries or when the next wait would pass
  `max_retry_time_s` since the first try, whichever comes first; then `EndpointUnreachableError`
  names the URL and the last error. Any other 4xx is not retried (`EndpointRequestError`).
- With a cache directory, every answer is stored in a file named by the SHA-256 of the request body
  (model, messages, decoding parameters: never the key), written atomically before it is returned.
  A resumed stage reads it back and the server is never asked the same request twice.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lidr_jax.files import as_path, atomic_write_json
from lidr_jax.settings import check_settings, setting

Message = dict[str, str]
WAIT_NOTICE_S = 10.0  # a request unanswered this long prints a one-line wait message (or at half its timeout)


class EndpointUnreachableError(ConnectionError):
    """The endpoint did not answer after every allowed retry."""


class EndpointRequestError(RuntimeError):
    """The endpoint refused the request (a 4xx other than 429) or answered in a shape that is not a chat
    completion: retrying would not help."""


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    """Where and how to reach an OpenAI-compatible `/chat/completions` endpoint.

    url: the base URL ("http://localhost:8000/v1") or the full ".../chat/completions" URL.
    model: the model name the server expects in the request.
    api_key_env: the NAME of the environment variable holding the key; "" sends no key.
    """

    url: str = setting("", 'the base URL ("http://localhost:8000/v1") or the full ".../chat/completions" URL')
    model: str = setting("", "the model name the server expects in the request")
    api_key_env: str = setting(
        "OPENAI_API_KEY", 'the NAME of the environment variable holding the key; "" sends no key'
    )
    timeout_s: float = setting(120.0, "seconds one request may take", gt=0)
    max_retries: int = setting(6, "retries after the first try", ge=0)
    backoff_s: float = setting(1.0, "the wait before retry k (k = 0, 1, ...) is backoff_s * 2**k ...", ge=0)
    max_backoff_s: float = setting(60.0, "... capped here; a Retry-After header replaces it", ge=0)
    max_retry_time_s: float = setting(600.0, "no retry starts later than this after the first try", ge=0)
    concurrency: int = setting(4, "requests in flight at once (complete_many)", ge=1)

    def __post_init__(self):
        check_settings(self)
        for name in ("timeout_s", "backoff_s", "max_backoff_s", "max_retry_time_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"endpoint {name} must be a finite number of seconds, got {getattr(self, name)!r}")
        if self.url:
            check_url(self.url)

    @property
    def completions_url(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    @property
    def shown_url(self) -> str:
        """`completions_url` as printed: a password in it replaced by ***."""
        return masked_url(self.completions_url)


def masked_url(url: str) -> str:
    """`url` with the password of its user part (http://user:PASSWORD@host) replaced by ***: the form in
    which every message and record shows a URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def check_url(url: str) -> None:
    """An endpoint URL must be http(s) with a host; anything else is a `ValueError` saying so (the URL
    shown with its password masked)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as e:
        raise ValueError(
            f"endpoint url {masked_url(url)!r} is not a valid URL ({e}); give e.g. http://localhost:8000/v1"
        ) from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"endpoint url {masked_url(url)!r} is not an http(s) URL (scheme {parts.scheme or 'none'!r}); "
            "give e.g. http://localhost:8000/v1"
        )
    if not parts.hostname:
        raise ValueError(f"endpoint url {masked_url(url)!r} has no host; give e.g. http://localhost:8000/v1")


def check_reachable(config: EndpointConfig, what: str, timeout_s: float = 10.0) -> None:
    """Before any work: the API key variable is set and the endpoint's host accepts a TCP connection
    within `timeout_s` (nothing is sent, so nothing is billed); else `EndpointRequestError` /
    `EndpointUnreachableError` naming `what` (e.g. "lidr.translator.endpoint") and the masked URL."""
    name, url = config.api_key_env, config.shown_url
    if name and not os.environ.get(name):
        raise EndpointRequestError(
            f"{what}: the API key variable {name} for {url} is not set; export it, or set api_key_env to an empty "
            "string for an endpoint that needs no key"
        )
    parts = urllib.parse.urlsplit(config.completions_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        reason = f"no connection within {timeout_s:g} s" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise EndpointUnreachableError(
            f"{what}: {url} cannot be reached ({reason}); check the URL and that the server is running "
            "(nothing was started)"
        ) from None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A `Retry-After` header's wait in seconds (delta-seconds or an HTTP date); None when absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def request_key(body: dict[str, Any]) -> str:
    """The cache key of a request body: SHA-256 of its canonical JSON (sorted keys, UTF-8)."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ChatClient:
    """Chat completions with retries and an on-disk answer cache (see the module docstring).

    `sleep` and `clock` are replaceable so tests can check the retry schedule without waiting."""

    def __init__(
        self,
        config: EndpointConfig,
        cache_dir: str | os.PathLike | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not config.url:
            raise ValueError("the endpoint needs a url (e.g. http://localhost:8000/v1)")
        if not config.model:
            raise ValueError(f"the endpoint {masked_url(config.url)} needs a model name")
        self.config = config
        self.cache_dir = as_path(cache_dir) if cache_dir is not None else None  # local, or a run on gs://
        self._sleep, self._clock = sleep, clock
        self.requests_sent = 0  # HTTP requests actually sent (retries included); cache hits send none
        # A request with no answer after this long prints one line saying so and when it gives up.
        self.wait_notice_s = min(WAIT_NOTICE_S, config.timeout_s / 2)
        self._noticed, self._lock = False, threading.Lock()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        name = self.config.api_key_env
        if name:
            key = os.environ.get(name)
            if not key:
                raise EndpointRequestError(
                    f"the API key variable {name} for {self.config.shown_url} is not set; export it, or "
                    "set api_key_env to an empty string for an endpoint that needs no key"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _cache_path(self, body: dict[str, Any]) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{request_key(body)}.json"

    def complete(self, messages: Sequence[Message], **params: Any) -> str:
        """The assistant's reply to `messages`. `params` go into the request body as they are
        (max_tokens, temperature, top_p, stop, ...)."""
        body = self._body(messages, params)
        path = self._cache_path(body)
        if path is not None and path.exists():
            try:
                return json.loads(path.read_text(encoding="utf-8"))["content"]
            except (ValueError, KeyError, TypeError):
                pass  # a cache file from elsewhere or damaged: ask again and overwrite it
        content = self._post(body)
        if path is not None:
            atomic_write_json(path, {"request": body, "content": content})
        return content

    def _body(self, messages: Sequence[Message], params: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.config.model, "messages": [dict(m) for m in messages], **params}

    def complete_many(self, chats: Sequence[Sequence[Message]], **params: Any) -> list[str]:
        """`complete` for each chat, `concurrency` at a time, in order. Equal requests are sent once and
        share the answer (two equal requests in flight at once would both miss the cache)."""
        keys = [request_key(self._body(m, params)) for m in chats]
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            answers = dict(zip(first, pool.map(lambda i: self.complete(chats[i], **params), first.values())))
        return [answers[key] for key in keys]

    def _notice_wait(self) -> None:
        """Printed (once per client) when a request has had no answer for `wait_notice_s`."""
        with self._lock:
            if self._noticed:
                return
            self._noticed = True
        cfg = self.config
        print(
            f"waiting for {cfg.shown_url}: no answer after {self.wait_notice_s:g} s; each request gives up after "
            f"{cfg.timeout_s:g} s (timeout_s) and retrying stops {cfg.max_retry_time_s:g} s after the first try "
            "(max_retry_time_s)",
            file=sys.stderr,
            flush=True,
        )

    def _post(self, body: dict[str, Any]) -> str:
        cfg, url, shown = self.config, self.config.completions_url, self.config.shown_url
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = self._headers()
        start = self._clock()
        last_error, retry = "", 0
        while True:
            self.requests_sent += 1
            wait_hint = None
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method="POST")
                notice = threading.Timer(self.wait_notice_s, self._notice_wait)
                notice.daemon = True
                notice.start()
                try:
                    with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                        payload = json.loads(response.read().decode("utf-8"))
                finally:
                    notice.cancel()
                content = payload["choices"][0]["message"]["content"]
                return content or ""
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if not (e.code == 429 or e.code >= 500):
                    raise EndpointRequestError(f"endpoint {shown} refused the request: HTTP {e.code}: {detail}") from e
                last_error = f"HTTP {e.code}: {detail}"
                wait_hint = retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise EndpointRequestError(
                    f"endpoint {shown} answered without choices[0].message.content ({e!r}); is it an "
                    "OpenAI-compatible chat-completions endpoint?"
                ) from e
            wait = wait_hint if wait_hint is not None else min(cfg.backoff_s * 2**retry, cfg.max_backoff_s)
            elapsed = self._clock() - start
            if retry >= cfg.max_retries or elapsed + wait > cfg.max_retry_time_s:
                raise EndpointUnreachableError(
                    f"endpoint {shown} did not answer after {retry + 1} tries in {elapsed:.0f} s (last error: "
                    f"{last_error}); check the URL and that the server is running"
                )
            self._sleep(wait)
            retry += 1
