"""The generation engine: B slots over one KV cache, refilled as rows end (continuous batching).

The engine holds B slots, each with its cache rows, its length (`end_B`, the model's cache protocol)
and its sampling state. Between decode chunks the host looks at the slots: a row that ended (an
end-of-sequence id, its budget, a stop string) frees its slot, and waiting prompts are prefilled in a
small batch and inserted into the free slots while the other rows keep their state. A decode chunk
ends early when a row ends and prompts wait, so a slot idles for at most one step.

Shapes, all fixed per engine (B slots, S cache slots per row), so a refill never recompiles:
- refill: P prompts (a power of two up to B) of T tokens (`PREFILL_BUCKETS`) prefilled and their rows
  copied into up to B slots, one executable per (P, T); prompts over `PREFILL_CHUNK` tokens are
  prefilled that many tokens at a time (`prefill_logits`);
- decode: the B slots, attending to the first W slots only: W is the longest live row plus the chunk,
  bucketed by `WINDOW_BUCKETS`, when that is at most S / 2 (the chunk then runs on a copy of those W
  slots, written back at its end: `_window`), else S (no copy); a chunk stops before a row outgrows
  W. One executable per W: the buckets up to S / 2, and S.
- compact: once no prompt waits and half the slots or more are idle, the live rows move into the
  fewest slots (a power of two), so the last rows of a call do not step idle slots (not under a mesh,
  whose batch split needs the slot count). One executable per (B, B'); the smaller engine then
  compiles its own decode windows.
Shared prefixes: the `n` samples of a prompt are prefilled once and the prompt's cache rows copied
into `n` slots; samples that find no free slot wait and are inserted later from the kept prefilled
rows (`Prefilled`; an insert executable per (P, T)), so each prompt is prefilled once whatever the
slot count (`EngineStats.prefilled_prompts` counts prefills).

A row's random draw at its own step t uses fold_in(seed, prompt hash, sample index, t)
(lidr_jax.sampling.rules.row_keys): it does not depend on the slot, the batch or the other prompts.

Shape key: B slots, P prefilled prompts, T prompt tokens, S cache slots, W attended slots, V vocabulary,
M assignments (slot, prefilled row) of one insert, R output buffer (new tokens per row), E eos ids.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import hidden_states, init_cache, unembed
from lidr_jax.parallel.sharding import active, put_batch
from lidr_jax.sampling.rules import apply_repetition_penalty, row_keys, sample_logits, token_logprobs
from lidr_jax.shapes import bucket

PREFILL_BUCKETS = dict(minimum=32, knee=128, step=64)  # prompt lengths: 32, 64, 128, 192, 256, ...
WINDOW_BUCKETS = dict(minimum=128, knee=128, step=128)  # attended cache slots in a decode chunk
OUTPUT_BUCKETS = dict(minimum=32, knee=256, step=256)  # new tokens per row (the output buffer R)
PREFILL_CHUNK = 256  # longer prompts are prefilled this many tokens at a time (`prefill_logits`)


@dataclasses.dataclass
class EngineStats:
    prefilled_prompts: int = 0  # prompt prefills run (one per prompt, whatever its n)
    prefill_calls: int = 0
    decode_steps: int = 0  # decode steps of the whole engine (every slot steps together)
    slot_steps: int = 0  # slots x decode steps
    compilations: int = 0
    compile_seconds: float = 0.0

    def utilisation(self, generated_tokens: int) -> float:
        """Generated tokens / (slots x decode steps)."""
        return generated_tokens / self.slot_steps if self.slot_steps else 0.0


# ------------------------------------------------------------------------------------------ device side


def _window(cache, W: int):
    """The first W slots of every layer's buffers (a copy: the decode loop then reads W slots only)."""
    return {"k": [b[..., :W] for b in cache["k"]], "v": [b[:, :, :W] for b in cache["v"]], "end_B": cache["end_B"]}


def _unwindow(cache, win):
    """The window's slots written back into the whole cache (in place: the cache is donated)."""
    W = win["v"][0].shape[2]
    return {
        "k": [b.at[..., :W].set(w) for b, w in zip(cache["k"], win["k"])],
        "v": [b.at[:, :, :W].set(w) for b, w in zip(cache["v"], win["v"])],
        "end_B": win["end_B"],
    }


def prefill_logits(params, layers, tokens_BT, mask_BT, config: ModelConfig, max_new: int, chunk: int = PREFILL_CHUNK):
    """Right-padded prompts [B, T] into a fresh cache of T + max_new slots: the logits [B, V] after each
    prompt's last token, and the cache. `layers`: per-layer weights or None (sampler.decode_layers).

    Prompts longer than `chunk` tokens are prefilled `chunk` tokens at a time (a `lax.scan` over the
    chunks, each writing into the cache and attending to it), so attention scores are [chunk, T] rather
    than [T, T] and activations [B, chunk, ...]: prefill memory is bounded by the chunk, not the prompt."""
    B, T = tokens_BT.shape
    last_B = jnp.maximum(jnp.sum(mask_BT, axis=1) - 1, 0)  # unembed only each row's last prompt token
    if chunk >= T:
        cache = init_cache(config, B, T + max_new)
        h_BTD, cache = hidden_states(params, tokens_BT, config, attention_mask_BT=mask_BT, cache=cache, layers=layers)
        return unembed(params, h_BTD[jnp.arange(B), last_B], config), cache
    n = -(-T // chunk)
    pad = ((0, 0), (0, n * chunk - T))  # the last chunk padded; its padding is never a row's token
    tokens_NBC = jnp.pad(tokens_BT, pad).reshape(B, n, chunk).transpose(1, 0, 2)
    mask_NBC = jnp.pad(mask_BT, pad).reshape(B, n, chunk).transpose(1, 0, 2)
    cache = init_cache(config, B, n * chunk + max_new)
    cache["end_B"] = jnp.zeros((B,), jnp.int32)  # every chunk, the first too, attends to the cache

    def one(carry, xs):
        cache, h_BD = carry
        i, tokens_BC, mask_BC = xs
        h_BCD, cache = hidden_states(
            params, tokens_BC, config, attention_mask_BT=mask_BC, cache=cache, layers=layers, kv_len=n * chunk
        )
        here_B = (last_B >= i * chunk) & (last_B < (i + 1) * chunk)
        h_BD = jnp.where(here_B[:, None], h_BCD[jnp.arange(B), jnp.clip(last_B - i * chunk, 0, chunk - 1)], h_BD)
        return (cache, h_BD), None

    h_BD = jnp.zeros((B, config.hidden_size), config.dtype)
    (cache, h_BD), _ = jax.lax.scan(one, (cache, h_BD), (jnp.arange(n), tokens_NBC, mask_NBC))
    # The last chunk's padding slots dropped: the cache has T + max_new slots.
    return unembed(params, h_BD, config), _window(cache, T + max_new)


def step_logits(params, layers, tokens_B, cache, config: ModelConfig, live_B=None, kv_len=None):
    """One decode step: one token per row at the row's next cache slot (its position). Rows not
    `live_B` write a slot that is not counted (their length stays)."""
    mask_B1 = None if live_B is None else live_B[:, None]
    h_B1D, cache = hidden_states(
        params, tokens_B[:, None], config, attention_mask_BT=mask_B1, cache=cache, layers=layers, kv_len=kv_len
    )
    return unembed(params, h_B1D[:, 0], config), cache


def _prefill(params, layers, tokens_PT, mask_PT, *, config: ModelConfig):
    logits_PV, cache = prefill_logits(params, layers, tokens_PT, mask_PT, config, 0)
    P, V = logits_PV.shape
    seen_PV = (
        jnp.zeros((P, V), bool).at[jnp.arange(P)[:, None], jnp.where(mask_PT, tokens_PT, V)].set(True, mode="drop")
    )
    return {"logits": logits_PV, "seen": seen_PV, "k": cache["k"], "v": cache["v"], "end": cache["end_B"]}


def _insert(state, cache, new, slots_M, src_M, rows_M):
    """Copy prefilled rows `src_M` into slots `slots_M` (B = no assignment, dropped) with their
    per-row settings `rows_M` (pid, sid, budget)."""
    T = new["v"][0].shape[2]

    def put(buf, rows):
        return buf.at[slots_M].set(rows[src_M], mode="drop")

    cache = {
        "k": [b.at[slots_M, :, :, :T].set(n[src_M], mode="drop") for b, n in zip(cache["k"], new["k"])],
        "v": [b.at[slots_M, :, :T].set(n[src_M], mode="drop") for b, n in zip(cache["v"], new["v"])],
        "end_B": put(cache["end_B"], new["end"]),
    }
    zeros_M = jnp.zeros_like(src_M)
    state = dict(
        state,
        logits_BV=put(state["logits_BV"], new["logits"]),
        seen_BV=put(state["seen_BV"], new["seen"]),
        count_B=state["count_B"].at[slots_M].set(zeros_M, mode="drop"),
        done_B=state["done_B"].at[slots_M].set(rows_M["budget"] <= 0, mode="drop"),
        pid_B=state["pid_B"].at[slots_M].set(rows_M["pid"], mode="drop"),
        sid_B=state["sid_B"].at[slots_M].set(rows_M["sid"], mode="drop"),
        budget_B=state["budget_B"].at[slots_M].set(rows_M["budget"], mode="drop"),
    )
    return state, cache


def _sample_step(state, sp, eos_E):
    """Pick each live row's next token (at the row's own step count_B) and record it."""
    logits_BV, count_B = state["logits_BV"], state["count_B"]
    keys_B = row_keys(sp["seed"], state["pid_B"], state["sid_B"], count_B)
    penalized_BV = jax.lax.cond(
        sp["penalty"] != 1.0,
        lambda x: apply_repetition_penalty(x, state["seen_BV"], sp["penalty"]),
        lambda x: x,
        logits_BV,
    )
    live_B = ~state["done_B"]
    tok_B = jnp.where(live_B, sample_logits(keys_B, penalized_BV, sp["temperature"], sp["top_k"], sp["top_p"]), 0)
    B, V = logits_BV.shape
    at_B = jnp.where(live_B, count_B, state["tokens_BR"].shape[1])  # dead rows write nothing (dropped)
    new_count_B = count_B + live_B
    is_eos_B = jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)
    state = dict(
        state,
        tokens_BR=state["tokens_BR"].at[jnp.arange(B), at_B].set(tok_B, mode="drop"),
        logprobs_BR=state["logprobs_BR"].at[jnp.arange(B), at_B].set(token_logprobs(logits_BV, tok_B), mode="drop"),
        count_B=new_count_B,
        done_B=state["done_B"] | (live_B & (is_eos_B | (new_count_B >= state["budget_B"]))),
        seen_BV=state["seen_BV"].at[jnp.arange(B), jnp.where(live_B, tok_B, V)].set(True, mode="drop"),
    )
    return state, tok_B, live_B


def _decode(params, layers, state, cache, sp, eos_E, max_steps, stop_on_end, *, config: ModelConfig, kv_len: int):
    """Decode steps until every row is done, `max_steps` steps ran, or (with `stop_on_end`) a row
    ended. Returns the state, the cache and the number of steps run.

    The steps run over a copy of the first `kv_len` slots (`_window`), written back once at the end:
    on XLA:CPU a slice of the cache inside the step is a copy of every layer's window at every step
    (BENCHMARKS.md, "Decode step profile"), so the window is cut once per chunk instead."""
    live0_B = ~state["done_B"]
    windowed = kv_len < cache["v"][0].shape[2]
    win = _window(cache, kv_len) if windowed else cache

    def cond(carry):
        state, _, steps = carry
        ended = jnp.any(live0_B & state["done_B"])
        return (steps < max_steps) & ~jnp.all(state["done_B"]) & ~(stop_on_end & ended)

    def body(carry):
        state, cache, steps = carry
        state, tok_B, live_B = _sample_step(state, sp, eos_E)
        # The sampled token enters the cache at the row's next slot. After a row's last token this
        # forward is wasted for that row (its logits are never used), which keeps one loop body.
        logits_BV, cache = step_logits(params, layers, tok_B, cache, config, live_B=live_B)
        return dict(state, logits_BV=logits_BV), cache, steps + 1

    state, win, steps = jax.lax.while_loop(cond, body, (state, win, jnp.zeros((), jnp.int32)))
    return state, _unwindow(cache, win) if windowed else win, steps


def _refill_step(params, layers, state, cache, tokens_PT, mask_PT, slots_M, src_M, rows_M, *, config: ModelConfig):
    """Prefill P prompts and insert them into their slots: one executable per (P, T), not two. The
    prefilled rows come back too, for the samples of a prompt that did not fit (`Prefilled`)."""
    new = _prefill(params, layers, tokens_PT, mask_PT, config=config)
    return *_insert(state, cache, new, slots_M, src_M, rows_M), new


_refill_jit = jax.jit(_refill_step, static_argnames=("config",), donate_argnames=("state", "cache"))
_insert_jit = jax.jit(_insert, donate_argnames=("state", "cache"))


@dataclasses.dataclass
class Prefilled:
    """The last refill's prefilled rows, kept while samples of its prompts still wait: those samples
    are inserted from here, so a prompt is prefilled once whatever slots its samples land in."""

    prompts: list[int]  # request index of each prefilled row
    new: dict


def _compact(state, cache, take_B):
    """The slots `take_B` (live rows first, then free ones) as a smaller engine: every per-slot array
    gathered to len(take_B) rows."""
    return jax.tree.map(lambda x: x[take_B], state), jax.tree.map(lambda x: x[take_B], cache)


_compact_jit = jax.jit(_compact)  # no donation: the outputs are smaller than the inputs
_decode_jit = jax.jit(_decode, static_argnames=("config", "kv_len"), donate_argnames=("state", "cache"))
_EXECUTABLES: dict[tuple, Any] = {}  # compiled by shape: counted and timed exactly


def _compiled(kind: str, key: tuple, lower: Callable, stats: EngineStats):
    key = (kind, *key, jax.default_backend())
    if key not in _EXECUTABLES:
        start = time.perf_counter()
        _EXECUTABLES[key] = lower().compile()
        stats.compilations += 1
        stats.compile_seconds += time.perf_counter() - start
    return _EXECUTABLES[key]


def _avals(tree) -> tuple:
    return tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in jax.tree.leaves(tree))


# -------------------------------------------------------------------------------------------- host side


@dataclasses.dataclass
class Request:
    """One prompt: its token ids, `n` samples, each with `budget` new tokens at most."""

    ids: list[int]
    n: int
    budget: int
    pid: int  # the prompt's hash (random keys)


def run(
    params,
    layers,
    config: ModelConfig,
    requests: list[Request],
    sp: dict,
    eos: tuple[int, ...],
    *,
    slots: int,
    chunk: int,
    pad_id: int,
    stats: EngineStats,
    stop_check: Callable[[list[int]], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
):
    """Generate every sample of every request. Returns {(request index, sample): (token ids, logprobs)}.

    `stop_check(ids)` (stop strings) is asked between chunks about each live row's output;
    `on_progress(new_tokens, finished_rows)` after each chunk."""
    B = slots
    T_max = bucket(max(len(r.ids) for r in requests), **PREFILL_BUCKETS)
    R = bucket(max(r.budget for r in requests), **OUTPUT_BUCKETS)
    S = T_max + R
    V = config.vocab_size
    eos_E = np.asarray(eos, np.int32)
    cache = init_cache(config, B, S)
    state = dict(
        logits_BV=np.zeros((B, V), np.float32),
        seen_BV=np.zeros((B, V), bool),
        tokens_BR=np.zeros((B, R), np.int32),
        logprobs_BR=np.zeros((B, R), np.float32),
        count_B=np.zeros((B,), np.int32),
        done_B=np.ones((B,), bool),
        pid_B=np.zeros((B,), np.uint32),
        sid_B=np.zeros((B,), np.int32),
        budget_B=np.zeros((B,), np.int32),
    )
    # Slots over the active mesh's batch axes, if any (every process passes the same values).
    state, cache["end_B"] = put_batch((state, np.zeros((B,), np.int32)))
    # Longest prompts first (as the static sampler did): the long rows start early, the short ones fill in.
    waiting = [
        (i, j) for i in sorted(range(len(requests)), key=lambda i: -len(requests[i].ids)) for j in range(requests[i].n)
    ]
    slot_row: list[tuple[int, int] | None] = [None] * B
    reported_B = np.zeros((B,), np.int64)  # tokens of each slot's row already passed to on_progress
    out: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
    kept: Prefilled | None = None
    while waiting or any(r is not None for r in slot_row):
        free = [b for b in range(B) if slot_row[b] is None]
        while free and waiting:
            state, cache, kept = _refill(
                params, layers, config, requests, waiting, free, slot_row, state, cache, stats, pad_id, kept
            )
            reported_B[free] = 0
            free = [b for b in range(B) if slot_row[b] is None]
        live = [b for b in range(B) if slot_row[b] is not None]
        if not waiting and active() is None and len(live) <= B // 2:
            # The last rows of a call: no prompt waits, half the slots or more idle. Their rows move into
            # the fewest slots (a power of two), so idle slots stop costing steps (`_compact`).
            B = bucket(len(live), minimum=1, knee=B, step=B)
            take_B = np.asarray(live + [b for b in range(len(slot_row)) if slot_row[b] is None][: B - len(live)])
            compact = _compiled(
                "compact",
                (_avals((state, cache)), B),
                lambda state=state, cache=cache, take_B=take_B: _compact_jit.lower(state, cache, take_B),
                stats,
            )
            state, cache = compact(state, cache, take_B)
            slot_row, reported_B, live = [slot_row[b] for b in take_B], reported_B[take_B], list(range(len(live)))
        max_end = int(np.asarray(cache["end_B"])[live].max())
        W = bucket(max_end + chunk, **WINDOW_BUCKETS)
        W = W if 2 * W <= S else S  # a window is copied in and out once per chunk: only worth it when small
        steps_cap = W - max_end  # each step writes at a live row's end: it must stay inside the window
        decode = _compiled(
            "decode",
            (config, _avals((params, layers, state, cache)), W, eos_E.shape),
            lambda state=state, cache=cache, W=W: _decode_jit.lower(
                params, layers, state, cache, sp, eos_E, np.int32(0), np.bool_(False), config=config, kv_len=W
            ),
            stats,
        )
        state, cache, steps = decode(
            params, layers, state, cache, sp, eos_E, np.int32(min(chunk, steps_cap)), np.bool_(bool(waiting))
        )
        steps = int(steps)
        stats.decode_steps += steps
        stats.slot_steps += steps * B
        done_B, count_B = np.array(state["done_B"]), np.asarray(state["count_B"])
        tokens_BR = np.asarray(state["tokens_BR"])
        if stop_check is not None:
            for b in range(B):
                if slot_row[b] is not None and not done_B[b] and stop_check(tokens_BR[b, : count_B[b]].tolist()):
                    done_B[b] = True
            state = dict(state, done_B=jax.device_put(done_B, state["done_B"].sharding))
        finished, logprobs_BR = 0, None
        occupied = [b for b in range(B) if slot_row[b] is not None]
        new_tokens = int((count_B[occupied] - reported_B[occupied]).sum())
        reported_B[occupied] = count_B[occupied]
        for b in occupied:
            if done_B[b]:
                logprobs_BR = np.asarray(state["logprobs_BR"]) if logprobs_BR is None else logprobs_BR
                out[slot_row[b]] = (tokens_BR[b, : count_B[b]].tolist(), logprobs_BR[b, : count_B[b]].tolist())
                slot_row[b] = None
                finished += 1
        if on_progress is not None:
            on_progress(new_tokens, finished)
    return out


def _refill(params, layers, config, requests, waiting, free, slot_row, state, cache, stats, pad_id, kept):
    """Insert the next waiting samples into `free` slots: those of prompts prefilled by the last refill
    (`kept`) from its rows, else the next prompts prefilled (each once, whatever its samples). Returns
    the state, the cache and what to keep for the samples still waiting."""
    B = len(slot_row)
    reuse = kept is not None and waiting[0][0] in kept.prompts
    take: list[tuple[int, int]] = []
    while waiting and len(take) < len(free) and (not reuse or waiting[0][0] in kept.prompts):
        take.append(waiting.pop(0))
    prompts = kept.prompts if reuse else list(dict.fromkeys(i for i, _ in take))  # each prompt once, in order
    slots_M = np.full((B,), B, np.int32)  # B: no assignment
    src_M = np.zeros((B,), np.int32)
    rows_M = {"pid": np.zeros((B,), np.uint32), "sid": np.zeros((B,), np.int32), "budget": np.zeros((B,), np.int32)}
    for m, ((i, j), b) in enumerate(zip(take, free)):
        slots_M[m], src_M[m] = b, prompts.index(i)
        rows_M["pid"][m], rows_M["sid"][m], rows_M["budget"][m] = requests[i].pid, j, requests[i].budget
        slot_row[b] = (i, j)
    if reuse:
        args = (state, cache, kept.new, slots_M, src_M, rows_M)
        insert = _compiled("insert", (_avals(args[:3]),), lambda: _insert_jit.lower(*args), stats)
        state, cache = insert(*args)
        new = kept.new
    else:
        P = min(bucket(len(prompts), minimum=1, knee=B, step=B), B)
        T = bucket(max(len(requests[i].ids) for i in prompts), **PREFILL_BUCKETS)
        tokens_PT = np.full((P, T), pad_id, np.int32)
        mask_PT = np.zeros((P, T), bool)
        mask_PT[len(prompts) :, 0] = True  # filler rows: one token, never inserted
        for p, i in enumerate(prompts):
            tokens_PT[p, : len(requests[i].ids)] = requests[i].ids
            mask_PT[p, : len(requests[i].ids)] = True
        args = (params, layers, state, cache, tokens_PT, mask_PT, slots_M, src_M, rows_M)
        refill = _compiled(
            "prefill",
            (config, _avals((params, layers, state, cache)), P, T),
            lambda: _refill_jit.lower(*args, config=config),
            stats,
        )
        state, cache, new = refill(*args)
        stats.prefilled_prompts += len(prompts)
        stats.prefill_calls += 1
    still = waiting and waiting[0][0] in prompts  # samples of a prefilled prompt still wait
    return state, cache, Prefilled(prompts, new) if still else None
