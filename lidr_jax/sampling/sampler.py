"""Text generation for lists of prompts, over the continuous-batching engine (lidr_jax.sampling.engine).

    results = generate(model, prompts, SamplingConfig(max_new_tokens=128, repetition_penalty=1.1))
    results = generate(model, chats, SamplingConfig(...), prefill=["<translation>", ...])

Prompts are raw strings (encoded as they are) or chat message lists (the model's chat template with
the generation prompt). `prefill` is text that opens the assistant turn; generation continues after it
(one string for every prompt, or one per prompt, None for none). The result for prompt i is
`results[i]`, a `GenerationResult`; with `n` > 1 it is a list of `n` of them.

How a call runs (the rules, stated once):
- Rows (prompt, sample index) go through `batch_size` slots (fewer when there are fewer rows: a power
  of two), longest prompts first; a slot whose row ends is refilled at once with the next prompt
  (engine docstring: shapes, shared prefixes, compilations). Results come back in input order.
  Executables compiled are counted in `GenerationStats.compilations`; the progress bar shows tokens/s,
  slot utilisation (generated tokens / (slots x decode steps)) and compilations.
- Prompt length: no prompt is ever cut. The prompt limit is `max_prompt_tokens`, or by default (None)
  what the context holds after the answer budget, context - max_new_tokens (at most context - 1, and
  context - 1 when the budget alone fills the context). A prompt longer than the limit is refused:
  `long_prompts="error"` (the default) raises a one-line ValueError naming it before any work;
  `long_prompts="skip"` (the pipeline's stages) generates nothing for it and returns an empty result
  with finish_reason "prompt_too_long" and its full length in `prompt_tokens`, counted in
  `GenerationStats.skipped_prompts`, so the caller drops and counts it. A prompt within the limit whose
  new-token budget does not fit the context (an explicit limit above context - max_new_tokens) has its
  budget clipped, counted and reported in a warning. Prompts longer than `engine.PREFILL_CHUNK` tokens
  are prefilled in chunks of that many, so prefill memory is bounded by the chunk whatever the prompt
  length (attention scores [chunk, T], tests/test_sampler.py: a batch of context-long prompts under a
  12 GB address-space cap).
- A row stops at an end-of-sequence id (lidr_jax.formats.tokenizer.end_of_sequence_ids: the tokenizer's
  EOS and end-of-turn tokens, the model config's and generation config's `eos_token_id`), at
  `max_new_tokens`, or at a stop string. Stop strings are checked on the decoded text between decode
  chunks (a stopped row leaves its slot at the next chunk) and finally on the whole output; the text
  is cut before the earliest stop string and the token ids / logprobs after the token that completed it.
- Randomness: the key of row (prompt, sample j) at step t is fold_in(seed, hash(prompt tokens), j, t),
  so a prompt's samples do not depend on the slot count, the slot it lands in or the other prompts.
- Layers (`SamplingConfig.layer_layout`, `decode_layers`): "unstacked" decodes on a copy of the layer
  weights as per-layer arrays, made at the start of each call and dropped at its end (memory for a
  second copy of the layers while generating); "stacked" reads slices of the stacked weights, which
  XLA:CPU copies at every decode step (BENCHMARKS.md). "auto" (the default) is "unstacked" when the
  params live on one CPU device, else "stacked". Both give the same logits (tests/test_sampler.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np

from lidr_jax.formats.tokenizer import end_of_sequence_ids
from lidr_jax.model.llama import unstack_layers
from lidr_jax.progress import progress as progress_bar
from lidr_jax.sampling.engine import PREFILL_TOKENS, EngineStats, Request, SamplingValues
from lidr_jax.sampling.engine import run as run_engine
from lidr_jax.settings import check_settings, setting
from lidr_jax.shapes import bucket


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to generate. Sampling values are traced: changing them does not recompile."""

    max_new_tokens: int = setting(256, "new tokens per answer at most (clipped to the model's context)", ge=1)
    temperature: float = setting(0.0, "0 = greedy", ge=0)
    top_k: int = setting(0, "keep only the k most likely tokens; 0 = off", ge=0)
    top_p: float = setting(1.0, "keep the smallest set of tokens with this much probability; 1.0 = off", gt=0, le=1)
    repetition_penalty: float = setting(1.0, "transformers' semantics over prompt + output ids; 1.0 = off", gt=0)
    n: int = setting(1, "samples per prompt", ge=1)
    seed: int = setting(0, "seed of the sampling draws (greedy decoding draws nothing)")
    stop: tuple[str, ...] = setting((), "stop strings; the text is cut before the first one found")
    batch_size: int = setting(32, "engine slots: rows decoded together (a row is one sample of one prompt)", ge=1)
    max_prompt_tokens: int | None = setting(
        None, "null: context - max_new_tokens; a longer prompt is refused (module doc)", ge=1
    )
    long_prompts: Literal["error", "skip"] = setting("error", "a prompt over the limit: raise, or skip it (module doc)")
    prefill_tokens: int = setting(
        PREFILL_TOKENS,
        "a refill prefills at most this many prompt tokens (prompts x bucketed length; one prompt at least)",
        ge=1,
    )
    decode_chunk: int = setting(
        64, "decode steps between host checks (stop strings, refills, progress bar) at most", ge=1
    )
    progress: bool = setting(True, "progress on stderr with generated tokens/s (a bar on a terminal, lines in a log)")
    layer_layout: Literal["auto", "stacked", "unstacked"] = setting(
        "auto", "the layer weights decoding reads (module doc)"
    )

    def __post_init__(self):
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("SamplingConfig: stop must be a list of non-empty strings, not one string")
        object.__setattr__(self, "stop", tuple(self.stop))
        check_settings(self)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    text: str  # decoded output, without the end-of-sequence token and cut before any stop string
    token_ids: list[int]  # generated ids only (a final end-of-sequence id included)
    logprobs: list[float]  # log p of each generated id under the model (temperature 1, no penalty)
    finish_reason: str  # "stop" (end-of-sequence id or stop string), "length", or "prompt_too_long" (skipped)
    prompt_tokens: int  # the prompt's length in tokens (prompts are never cut)


@dataclasses.dataclass
class GenerationStats:
    """What a `generate` call did; pass one in as `stats=` to have it filled."""

    prompts: int = 0
    rows: int = 0
    batches: int = 0  # prefill calls (each fills free slots with the next prompts)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    compilations: int = 0  # executables compiled by this call: refill per (P, T), decode per window W
    compile_seconds: float = 0.0
    run_seconds: float = 0.0  # wall time excluding compilation
    skipped_prompts: int = 0  # prompts over the limit, not generated (long_prompts="skip")
    clipped_budgets: int = 0
    prefilled_prompts: int = 0  # prompt prefills (once per prompt, whatever its n)
    decode_steps: int = 0
    slot_steps: int = 0  # slots x decode steps
    shapes: list = dataclasses.field(default_factory=list)  # (slots, longest prompt, largest budget) per call

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.run_seconds if self.run_seconds else 0.0

    @property
    def slot_utilisation(self) -> float:
        """Generated tokens / (slots x decode steps): the share of slot steps that produced a token."""
        return self.generated_tokens / self.slot_steps if self.slot_steps else 0.0


# -------------------------------------------------------------------------------------------- host side


def decode_layers(params, layout: str = "auto") -> list | None:
    """The layer weights decoding reads: a list of per-layer dicts (a copy, `unstack_layers`) for
    "unstacked", None (slices of the stacked params) for "stacked"; "auto" picks "unstacked" when the
    params live on one CPU device (where slicing copies every layer's weights at every decode step)."""
    if layout == "auto":
        leaf = params["layers"]["wq"]
        devices = leaf.sharding.device_set if isinstance(leaf, jax.Array) else set()
        layout = "unstacked" if len(devices) == 1 and next(iter(devices)).platform == "cpu" else "stacked"
    return unstack_layers(params) if layout == "unstacked" else None


def eos_ids(model) -> tuple[int, ...]:
    """Every id that ends a row (lidr_jax.formats.tokenizer.end_of_sequence_ids of the model's
    tokenizer, config and generation config)."""
    gen = (getattr(model, "generation_config", None) or {}).get("eos_token_id")
    ids = end_of_sequence_ids(model.tokenizer, getattr(model.config, "eos_token_ids", ()), gen)
    if not ids:
        raise ValueError("the model names no end-of-sequence token; generation would only stop at max_new_tokens")
    return ids


def _prompt_hash(ids: Sequence[int]) -> int:
    digest = hashlib.blake2b(np.asarray(ids, np.int64).tobytes(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _tokenize(model, prompts, prefill) -> list[list[int]]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        raise TypeError("prompts must be a list of prompts: wrap a single string or message list in a list")
    if prefill is None or isinstance(prefill, str):
        prefill = [prefill] * len(prompts)
    if len(prefill) != len(prompts):
        raise ValueError(f"prefill has {len(prefill)} entries for {len(prompts)} prompts: give one per prompt")
    out = []
    for i, (p, pre) in enumerate(zip(prompts, prefill)):
        if not isinstance(p, str) and not (isinstance(p, (list, tuple)) and all(isinstance(m, dict) for m in p)):
            raise TypeError(f"prompt {i} is a {type(p).__name__}: give a string or a list of chat message dicts")
        ids = model.tokenizer.prompt_ids(p, prefill=pre)
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization: give at least one token of text")
        out.append(list(ids))
    return out


def _first_stop(text: str, stop: Sequence[str]) -> int:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else -1


def _finish(tokenizer, ids, logprobs, eos, stop, prompt_tokens) -> GenerationResult:
    """Turn a row's raw output into a result: drop the EOS from the text, apply stop strings."""
    reason = "stop" if ids and ids[-1] in eos else "length"
    body = ids[:-1] if reason == "stop" else ids
    text = tokenizer.decode(body)
    cut = _first_stop(text, stop) if stop else -1
    if cut >= 0:
        # The shortest token prefix whose text already holds a stop string (containment only grows).
        lo, hi = 1, len(body)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _first_stop(tokenizer.decode(body[:mid]), stop) >= 0 else (mid + 1, hi)
        ids, logprobs, text, reason = ids[:lo], logprobs[:lo], text[:cut], "stop"
    return GenerationResult(text, list(ids), list(logprobs), reason, prompt_tokens)


def generate(model, prompts, sampling: SamplingConfig = SamplingConfig(), *, prefill=None, stats=None):
    """Generate for every prompt. `model` has `.config`, `.params`, `.tokenizer` (a ChatTokenizer) and
    optionally `.generation_config`. Returns one `GenerationResult` per prompt, or a list of `n` per
    prompt when `sampling.n` > 1. See the module docstring for prefill, batching and stopping rules."""
    stats = stats if stats is not None else GenerationStats()
    config, tok, s = model.config, model.tokenizer, sampling
    eos = eos_ids(model)
    ids = _tokenize(model, prompts, prefill)
    context = config.max_position_embeddings
    limit = prompt_limit(s, context)
    too_long = [i for i, p in enumerate(ids) if len(p) > limit]
    if too_long and s.long_prompts == "error":
        i = too_long[0]
        raise ValueError(
            f"prompt {i} has {len(ids[i])} tokens, more than the prompt limit of {limit} "
            f"({_limit_source(s, context)}); {len(too_long)} of {len(ids)} prompts are over it and no prompt is cut: "
            "shorten them, lower max_new_tokens, or pass long_prompts='skip' to skip them"
        )
    stats.prompts += len(ids)
    stats.skipped_prompts += len(too_long)
    skipped = {i: len(ids[i]) for i in too_long}
    full_ids, ids = ids, [p for i, p in enumerate(ids) if i not in skipped]
    if not ids:
        return _assemble(full_ids, skipped, {}, s.n)
    budgets = [min(s.max_new_tokens, context - len(p)) for p in ids]
    clipped = sum(b < s.max_new_tokens for b in budgets)
    if clipped:
        warnings.warn(
            f"{clipped} of {len(ids)} new-token budgets were clipped to fit the model's context of {context} tokens "
            "(shorten the prompts, or lower max_new_tokens)",
            stacklevel=2,
        )
    stats.clipped_budgets += clipped
    stats.rows += len(ids) * s.n
    sp = SamplingValues.of(s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.seed)
    requests = [Request(p, s.n, b, _prompt_hash(p)) for p, b in zip(ids, budgets)]
    slots = min(s.batch_size, bucket(len(ids) * s.n, minimum=1, knee=s.batch_size, step=s.batch_size))
    engine = EngineStats()
    bar = progress_bar(len(ids) * s.n, "generate", "seq", enabled=s.progress)
    start, generated = time.perf_counter(), 0

    def progress(new_tokens: int, finished: int):
        nonlocal generated
        generated += new_tokens
        wall = time.perf_counter() - start - engine.compile_seconds
        bar.set_postfix(
            tok_s=f"{generated / max(wall, 1e-9):.1f}",
            slots=f"{engine.utilisation(generated):.0%}",
            compiles=engine.compilations,
            refresh=False,
        )
        bar.update(finished)

    def stop_check(out_ids: list[int]) -> bool:
        return _first_stop(tok.decode(out_ids), s.stop) >= 0

    raw = run_engine(
        model.params,
        decode_layers(model.params, s.layer_layout),
        config,
        requests,
        sp,
        eos,
        slots=slots,
        chunk=s.decode_chunk,
        pad_id=tok.pad_token_id,
        stats=engine,
        stop_check=stop_check if s.stop else None,
        on_progress=progress,
        prefill_tokens=s.prefill_tokens,
    )
    bar.close()
    stats.run_seconds += time.perf_counter() - start - engine.compile_seconds
    stats.compilations += engine.compilations
    stats.compile_seconds += engine.compile_seconds
    stats.generated_tokens += generated
    stats.prompt_tokens += sum(len(p) * s.n for p in ids)
    stats.prefilled_prompts += engine.prefilled_prompts
    stats.batches += engine.prefill_calls
    stats.decode_steps += engine.decode_steps
    stats.slot_steps += engine.slot_steps
    stats.shapes.append((slots, max(map(len, ids)), max(budgets)))
    outputs = {
        key: _finish(tok, out_ids, logprobs, eos, s.stop, len(ids[key[0]])) for key, (out_ids, logprobs) in raw.items()
    }
    return _assemble(full_ids, skipped, outputs, s.n)


def prompt_limit(sampling: SamplingConfig, context: int) -> int:
    """The longest prompt `generate` accepts (module docstring): `max_prompt_tokens`, or what the
    context holds after the answer budget; never more than context - 1 (room for one new token)."""
    if sampling.max_prompt_tokens is not None:
        return min(sampling.max_prompt_tokens, context - 1)
    room = context - sampling.max_new_tokens
    return room if room >= 1 else context - 1


def _limit_source(sampling: SamplingConfig, context: int) -> str:
    if sampling.max_prompt_tokens is not None and sampling.max_prompt_tokens < context:
        return "max_prompt_tokens"
    if sampling.max_prompt_tokens is None and context - sampling.max_new_tokens >= 1:
        return f"the context of {context} tokens - max_new_tokens {sampling.max_new_tokens}"
    return f"the context of {context} tokens - 1"


def _assemble(full_ids, skipped: dict[int, int], outputs: dict, n: int) -> list:
    """Results in input order: generated ones from `outputs` (keyed by the index among the generated
    prompts), an empty "prompt_too_long" result for each skipped prompt."""
    results, k = [], 0
    for i in range(len(full_ids)):
        if i in skipped:
            rows = [GenerationResult("", [], [], "prompt_too_long", skipped[i]) for _ in range(n)]
        else:
            rows = [outputs[(k, j)] for j in range(n)]
            k += 1
        results.append(rows[0] if n == 1 else rows)
    return results
