"""Batched text generation: prefill, then a jitted `lax.while_loop` decode over a donated KV cache.

    results = generate(model, prompts, SamplingConfig(max_new_tokens=128, repetition_penalty=1.1))
    results = generate(model, chats, SamplingConfig(...), prefill=["<translation>", ...])

Prompts are raw strings (encoded as they are) or chat message lists (the model's chat template with
the generation prompt). `prefill` is text that opens the assistant turn; generation continues after it
(one string for every prompt, or one per prompt, None for none). The result for prompt i is
`results[i]`, a `GenerationResult`; with `n` > 1 it is a list of `n` of them.

How a call runs (the rules, stated once):
- Rows (prompt, sample index) are sorted by prompt length, longest first, and cut into batches of
  `batch_size`; results come back in input order. Batch sizes are bucketed to powers of two (capped by
  `batch_size`), prompt lengths to powers of two from 64 up to 256 and multiples of 256 above, and the
  new-token buffer likewise from 32 (lidr_jax.shapes.bucket), so a call compiles a handful of shapes.
  Each shape compiles two executables (prefill, decode), counted in `GenerationStats.compilations` and
  shown in the progress bar.
- Prompts are right-padded (the cache protocol of lidr_jax.model.llama: each row's tokens from slot 0,
  its padding overwritten by its next tokens); positions count real tokens only.
- Truncation: a prompt longer than `max_prompt_tokens` (default and at most: the model's context - 1)
  keeps its LAST tokens (the chat generation prompt and the prefill live at the end); the new-token
  budget is clipped so prompt + output fit the context. Both are counted and reported in a warning.
- A row stops at an end-of-sequence id (lidr_jax.formats.tokenizer.end_of_sequence_ids: the tokenizer's
  EOS and end-of-turn tokens, the model config's and generation config's `eos_token_id`), at
  `max_new_tokens`, or at a stop string. Stop
  strings are checked on the decoded text between decode chunks (a stopped row leaves the loop at the
  next chunk) and finally on the whole output; the text is cut before the earliest stop string and the
  token ids / logprobs after the token that completed it.
- Randomness: the key of row (prompt, sample j) at step t is fold_in(seed, hash(prompt tokens), j, t),
  so a prompt's samples do not depend on the batch size, the batch order or the other prompts.
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
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lidr_jax.dist.sharding import put_batch
from lidr_jax.formats.tokenizer import end_of_sequence_ids
from lidr_jax.generate.rules import apply_repetition_penalty, row_keys, sample_logits, token_logprobs
from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import hidden_states, init_cache, unembed, unstack_layers
from lidr_jax.shapes import bucket

PROMPT_BUCKETS = dict(minimum=64, knee=256, step=256)  # prompt lengths (lidr_jax.shapes.bucket)
NEW_TOKEN_BUCKETS = dict(minimum=32, knee=256, step=256)  # new-token buffers


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to generate. Sampling values are traced: changing them does not recompile."""

    max_new_tokens: int = 256  # new tokens per answer at most (clipped to the model's context)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens with this much probability; 1.0 = off
    repetition_penalty: float = 1.0  # transformers' semantics over prompt + output ids; 1.0 = off
    n: int = 1  # samples per prompt
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the first one found
    batch_size: int = 32  # rows decoded together (a row is one sample of one prompt)
    max_prompt_tokens: int | None = None  # longer prompts keep their last tokens; None = context - 1
    decode_chunk: int = 64  # decode steps between host checks (stop strings, progress bar)
    progress: bool = True  # tqdm progress bar with generated tokens/s
    layer_layout: Literal["auto", "stacked", "unstacked"] = "auto"  # the layer weights decoding reads (module doc)

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1] (1 = off)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
            (self.n >= 1, "n must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.decode_chunk >= 1, "decode_chunk must be >= 1"),
            (self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1"),
            (not isinstance(self.stop, str), "stop must be a list of strings, not one string"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.layer_layout in ("auto", "stacked", "unstacked"), "layer_layout must be auto, stacked or unstacked"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingConfig: {message}")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    text: str  # decoded output, without the end-of-sequence token and cut before any stop string
    token_ids: list[int]  # generated ids only (a final end-of-sequence id included)
    logprobs: list[float]  # log p of each generated id under the model (temperature 1, no penalty)
    finish_reason: str  # "stop" (end-of-sequence id or stop string) or "length"
    prompt_tokens: int  # prompt length after any truncation


@dataclasses.dataclass
class GenerationStats:
    """What a `generate` call did; pass one in as `stats=` to have it filled."""

    prompts: int = 0
    rows: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    compilations: int = 0  # executables compiled by this call (prefill + decode per new shape)
    compile_seconds: float = 0.0
    run_seconds: float = 0.0  # wall time excluding compilation
    truncated_prompts: int = 0
    clipped_budgets: int = 0
    shapes: list = dataclasses.field(default_factory=list)  # (batch, prompt len, new-token buffer) per batch

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.run_seconds if self.run_seconds else 0.0


# ------------------------------------------------------------------------------------------ device side


def _sample_step(state, logits_BV, sp, eos_E):
    """Pick the token of step `state["step"]` for every live row and record it."""
    t = state["step"]
    keys_B = row_keys(sp["seed"], state["pid_B"], state["sid_B"], t)
    penalized_BV = jax.lax.cond(
        sp["penalty"] != 1.0,
        lambda x: apply_repetition_penalty(x, state["seen_BV"], sp["penalty"]),
        lambda x: x,
        logits_BV,
    )
    live_B = ~state["done_B"]
    tok_B = jnp.where(live_B, sample_logits(keys_B, penalized_BV, sp["temperature"], sp["top_k"], sp["top_p"]), 0)
    lp_B = token_logprobs(logits_BV, tok_B)
    count_B = state["count_B"] + live_B
    is_eos_B = jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)
    B, V = logits_BV.shape
    return dict(
        state,
        tokens_BN=jax.lax.dynamic_update_slice_in_dim(state["tokens_BN"], tok_B[:, None], t, axis=1),
        logprobs_BN=jax.lax.dynamic_update_slice_in_dim(state["logprobs_BN"], lp_B[:, None], t, axis=1),
        count_B=count_B,
        done_B=state["done_B"] | (live_B & (is_eos_B | (count_B >= state["budget_B"]))),
        seen_BV=state["seen_BV"].at[jnp.arange(B), jnp.where(live_B, tok_B, V)].set(True, mode="drop"),
        last_B=tok_B,
        step=t + 1,
    )


def prefill_logits(params, layers, tokens_BT, mask_BT, config: ModelConfig, max_new: int):
    """Right-padded prompts [B, T] into a fresh cache of T + max_new slots: the logits [B, V] after each
    prompt's last token, and the cache. `layers`: per-layer weights or None (`decode_layers`)."""
    B, T = tokens_BT.shape
    cache = init_cache(config, B, T + max_new)
    h_BTD, cache = hidden_states(params, tokens_BT, config, attention_mask_BT=mask_BT, cache=cache, layers=layers)
    # Unembed only each row's last prompt token.
    last_B = jnp.maximum(jnp.sum(mask_BT, axis=1) - 1, 0)
    return unembed(params, h_BTD[jnp.arange(B), last_B], config), cache


def step_logits(params, layers, tokens_B, cache, config: ModelConfig):
    """One decode step: one token per row, written at the row's next cache slot (its position)."""
    h_B1D, cache = hidden_states(params, tokens_B[:, None], config, cache=cache, layers=layers)
    return unembed(params, h_B1D[:, 0], config), cache


def _prefill(params, layers, tokens_BT, mask_BT, rows, *, config: ModelConfig, max_new: int):
    """Run the prompts through the model into a fresh cache; the decode loop samples from the logits."""
    logits_BV, cache = prefill_logits(params, layers, tokens_BT, mask_BT, config, max_new)
    B, V = logits_BV.shape
    seen_BV = (
        jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], jnp.where(mask_BT, tokens_BT, V)].set(True, mode="drop")
    )
    state = dict(
        logits_BV=logits_BV,
        tokens_BN=jnp.zeros((B, max_new), jnp.int32),
        logprobs_BN=jnp.zeros((B, max_new), jnp.float32),
        count_B=jnp.zeros((B,), jnp.int32),
        done_B=rows["budget_B"] <= 0,
        seen_BV=seen_BV,
        last_B=jnp.zeros((B,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        **rows,
    )
    return state, cache


def _decode(params, layers, state, cache, sp, eos_E, chunk_end, *, config: ModelConfig):
    """Sample and decode until every row is done or `chunk_end` steps are reached (traced: a new chunk
    end does not recompile). The sampling rules live only here, so they compile once per shape."""

    def cond(carry):
        state, _ = carry
        return (state["step"] < chunk_end) & ~jnp.all(state["done_B"])

    def body(carry):
        state, cache = carry
        state = _sample_step(state, state["logits_BV"], sp, eos_E)
        # The token sampled at step t goes in at position (and cache slot) prompt_len + t. After the
        # last step this forward is wasted (one step per batch), which keeps the loop a single body.
        logits_BV, cache = step_logits(params, layers, state["last_B"], cache, config)
        return dict(state, logits_BV=logits_BV), cache

    return jax.lax.while_loop(cond, body, (state, cache))


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "max_new"))
_decode_jit = jax.jit(_decode, static_argnames=("config",), donate_argnames=("state", "cache"))
# Compiled executables by shape: an explicit cache so compilations are counted and timed exactly.
_EXECUTABLES: dict[tuple, tuple[Any, Any]] = {}


def _executables(params, layers, arrays, sp, eos_E, config: ModelConfig, max_new: int, stats: GenerationStats):
    # Shardings are part of the key: an executable compiled for one mesh rejects arrays of another.
    leaves = jax.tree.leaves((params, layers))
    avals = (layers is None,) + tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)
    key = (
        config,
        avals,
        arrays[0].shape,
        getattr(arrays[0], "sharding", None),
        max_new,
        eos_E.shape,
        jax.default_backend(),
    )
    if key not in _EXECUTABLES:
        start = time.perf_counter()
        prefill = _prefill_jit.lower(params, layers, *arrays, config=config, max_new=max_new).compile()
        state, cache = prefill.out_info  # shapes and shardings of the prefill's outputs
        chunk = jax.ShapeDtypeStruct((), jnp.int32)
        decode = _decode_jit.lower(params, layers, state, cache, sp, eos_E, chunk, config=config).compile()
        _EXECUTABLES[key] = (prefill, decode)
        stats.compilations += 2
        stats.compile_seconds += time.perf_counter() - start
    return _EXECUTABLES[key]


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


def batch_bucket(rows: int, batch_size: int) -> int:
    """Powers of two, capped at `batch_size` (a full batch is always exactly `batch_size`)."""
    return min(bucket(rows, minimum=1, knee=batch_size, step=batch_size), batch_size)


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
    limit = min(s.max_prompt_tokens or context - 1, context - 1)
    truncated = sum(len(p) > limit for p in ids)
    ids = [p[-limit:] for p in ids]
    budgets = [min(s.max_new_tokens, context - len(p)) for p in ids]
    clipped = sum(b < s.max_new_tokens for b in budgets)
    if truncated or clipped:
        warnings.warn(
            f"{truncated} of {len(ids)} prompts were longer than {limit} tokens and keep only their last {limit}; "
            f"{clipped} new-token budgets were clipped to fit the model's context of {context} tokens "
            "(shorten the prompts, or lower max_new_tokens / max_prompt_tokens)",
            stacklevel=2,
        )
    stats.prompts += len(ids)
    stats.truncated_prompts += truncated
    stats.clipped_budgets += clipped
    rows = sorted(((i, j) for i in range(len(ids)) for j in range(s.n)), key=lambda r: (-len(ids[r[0]]), r))
    stats.rows += len(rows)
    sp = dict(
        temperature=np.float32(s.temperature),
        top_k=np.int32(s.top_k),
        top_p=np.float32(s.top_p),
        penalty=np.float32(s.repetition_penalty),
        seed=np.uint32(s.seed & 0xFFFFFFFF),
    )
    eos_E = np.asarray(eos, np.int32)
    params = model.params
    layers = decode_layers(params, s.layer_layout)
    hashes = [_prompt_hash(p) for p in ids]
    outputs: dict[tuple[int, int], GenerationResult] = {}
    bar = tqdm(total=len(rows), unit="seq", desc="generate", disable=not s.progress)
    for start in range(0, len(rows), s.batch_size):
        batch = rows[start : start + s.batch_size]
        B = batch_bucket(len(batch), s.batch_size)
        T = bucket(max(len(ids[i]) for i, _ in batch), **PROMPT_BUCKETS)
        N = bucket(max(budgets[i] for i, _ in batch), **NEW_TOKEN_BUCKETS)
        tokens_BT = np.full((B, T), tok.pad_token_id, np.int32)
        mask_BT = np.zeros((B, T), bool)
        cols = {k: np.zeros((B,), np.int32) for k in ("plen_B", "budget_B", "pid_B", "sid_B")}
        mask_BT[len(batch) :, 0] = True  # filler rows: one token, no budget, done from the start
        for r, (i, j) in enumerate(batch):
            tokens_BT[r, : len(ids[i])] = ids[i]
            mask_BT[r, : len(ids[i])] = True
            cols["plen_B"][r], cols["budget_B"][r], cols["pid_B"][r], cols["sid_B"][r] = (
                len(ids[i]),
                budgets[i],
                hashes[i],
                j,
            )
        cols["pid_B"] = cols["pid_B"].astype(np.uint32)
        arrays = put_batch((tokens_BT, mask_BT, cols))  # rows over the active mesh's batch axes, if any
        prefill_exe, decode_exe = _executables(params, layers, arrays, sp, eos_E, config, N, stats)
        bar.set_postfix(compiles=stats.compilations, shape=f"{B}x{T}+{N}", refresh=False)
        stats.shapes.append((B, T, N))
        stats.batches += 1
        t0 = time.perf_counter()
        state, cache = prefill_exe(params, layers, *arrays)
        done_B, counted = np.asarray(state["done_B"]), 0
        while not done_B.all():
            chunk_end = np.int32(min(int(state["step"]) + s.decode_chunk, N))
            state, cache = decode_exe(params, layers, state, cache, sp, eos_E, chunk_end)
            done_B, count_B = np.array(state["done_B"]), np.asarray(state["count_B"])
            if s.stop:  # a row whose text holds a stop string is done: take it out of the loop
                tokens_BN = np.asarray(state["tokens_BN"])
                for r in np.flatnonzero(~done_B[: len(batch)]):
                    done_B[r] = _first_stop(tok.decode(tokens_BN[r, : count_B[r]]), s.stop) >= 0
                state = dict(state, done_B=jax.device_put(done_B, state["done_B"].sharding))
            new = int(count_B.sum()) - counted
            counted += new
            stats.generated_tokens += new
            stats.run_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            bar.set_postfix(
                tok_s=f"{stats.tokens_per_second:.1f}", compiles=stats.compilations, shape=f"{B}x{T}+{N}", refresh=False
            )
        tokens_BN, logprobs_BN = np.asarray(state["tokens_BN"]), np.asarray(state["logprobs_BN"])
        count_B = np.asarray(state["count_B"])
        stats.generated_tokens += int(count_B.sum()) - counted
        stats.prompt_tokens += sum(len(ids[i]) for i, _ in batch)
        for r, (i, j) in enumerate(batch):
            n_r = int(count_B[r])
            outputs[(i, j)] = _finish(
                tok, tokens_BN[r, :n_r].tolist(), logprobs_BN[r, :n_r].tolist(), eos, s.stop, len(ids[i])
            )
        stats.run_seconds += time.perf_counter() - t0
        bar.update(len(batch))
    bar.close()
    if s.n == 1:
        return [outputs[(i, 0)] for i in range(len(ids))]
    return [[outputs[(i, j)] for j in range(s.n)] for i in range(len(ids))]
