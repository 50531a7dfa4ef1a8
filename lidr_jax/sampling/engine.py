"""The generation engine: B slots over one KV cache, refilled as rows end (continuous batching).

The engine holds B slots, each with its cache rows, its length (`end_B`, the model's cache protocol)
and its sampling state. Between decode chunks the host looks at the slots: a row that ended (an
end-of-sequence id, its budget, a stop string) frees its slot, and waiting prompts are prefilled in a
small batch and inserted into the free slots while the other rows keep their state. A decode chunk
ends early when a row ends and prompts wait, so a slot idles for at most one step.

Shapes, all fixed per engine (B slots, S cache slots per row), so a refill never recompiles:
- refill: P prompts (a power of two up to B) of T tokens (`PREFILL_BUCKETS`) prefilled and their rows
  copied into up to B slots, one executable per (P, T); prompts over `PREFILL_CHUNK` tokens are
  prefilled that many tokens at a time (`prefill_logits`). P x T stays within `prefill_tokens`
  (`prefill_rows`; at least one prompt per refill), so the prefilled rows' cache ([P, T] on top of the slots' own)
  is bounded by the budget, not by the slot count times the longest prompt: free slots then take
  several refills;
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

The host side is a `Scheduler` (which sample goes to which slot, when to refill, when a row ends; no
device work) and a `Device` (one call per executable: refill, insert, compact, decode); `run` loops over
them. Device values are typed pytrees: `Slots` (per-slot state), `SamplingValues`, `Prefill`,
`Assignment`, and the model's `KVCache`. Executables are kept in a bounded LRU (`_EXECUTABLES`,
`MAX_EXECUTABLES`); compilations and their time are counted from JAX's own compile events.

A row's random draw at its own step t uses fold_in(seed, prompt hash, sample index, t)
(lidr_jax.sampling.rules.row_keys): it does not depend on the slot, the batch or the other prompts.

Shape key: B slots, P prefilled prompts, T prompt tokens, S cache slots, W attended slots, V vocabulary,
M assignments (slot, prefilled row) of one insert, R output buffer (new tokens per row), E eos ids.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import KVCache, hidden_states, init_cache, unembed
from lidr_jax.parallel.sharding import active, put_batch
from lidr_jax.sampling.rules import apply_repetition_penalty, row_keys, sample_logits, token_logprobs
from lidr_jax.shapes import bucket

PREFILL_BUCKETS = dict(minimum=32, knee=128, step=64)  # prompt lengths: 32, 64, 128, 192, 256, ...
WINDOW_BUCKETS = dict(minimum=128, knee=128, step=128)  # attended cache slots in a decode chunk
OUTPUT_BUCKETS = dict(minimum=32, knee=256, step=256)  # new tokens per row (the output buffer R)
PREFILL_CHUNK = 256  # longer prompts are prefilled this many tokens at a time (`prefill_logits`)
PREFILL_TOKENS = 32768  # default bound on P x T of one refill (`prefill_rows`)


def prefill_rows(longest: int, budget: int = PREFILL_TOKENS) -> int:
    """The most prompts one refill prefills when its longest has `longest` tokens: the largest power of
    two P whose P rows of the bucketed length T fit `budget` tokens (P x T <= budget), at least 1."""
    T = bucket(longest, **PREFILL_BUCKETS)
    P = 1
    while budget >= 2 * P * T:
        P *= 2
    return P


MAX_EXECUTABLES = 64  # compiled executables kept (least recently used dropped; JAX keeps its own caches)


@dataclasses.dataclass
class EngineStats:
    prefilled_prompts: int = 0  # prompt prefills run (one per prompt, whatever its n)
    prefill_calls: int = 0
    decode_steps: int = 0  # decode steps of the whole engine (every slot steps together)
    slot_steps: int = 0  # slots x decode steps
    compilations: int = 0  # programs JAX lowered for this engine (compiled, or read from the persistent cache)
    compile_seconds: float = 0.0  # JAX's tracing, lowering and compiling time of those programs

    def utilisation(self, generated_tokens: int) -> float:
        """Generated tokens / (slots x decode steps)."""
        return generated_tokens / self.slot_steps if self.slot_steps else 0.0


# ------------------------------------------------------------------------------------ device values


def _pytree(cls):
    """A frozen dataclass whose fields are all arrays, registered as a pytree (jit arguments, tree.map)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)
    return jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)], meta_fields=[])


@_pytree
class SamplingValues:
    """The sampling settings as device values: another temperature, top-k, top-p, penalty or seed runs
    the same executables (nothing compiles)."""

    temperature: Any  # float32 scalar (0: greedy)
    top_k: Any  # int32 (0: off)
    top_p: Any  # float32 (1: off)
    penalty: Any  # float32 repetition penalty (1: off)
    seed: Any  # uint32

    @classmethod
    def of(cls, temperature: float, top_k: int, top_p: float, penalty: float, seed: int) -> SamplingValues:
        seed32 = np.uint32(seed & 0xFFFFFFFF)
        return cls(np.float32(temperature), np.int32(top_k), np.float32(top_p), np.float32(penalty), seed32)


@_pytree
class Slots:
    """The B slots' decoding state on the device (R: the output buffer, new tokens per row)."""

    logits_BV: Any  # float32: the logits of each row's next token
    seen_BV: Any  # bool: the ids in each row's prompt and output (repetition penalty)
    tokens_BR: Any  # int32: each row's new tokens
    logprobs_BR: Any  # float32: their log-probs
    count_B: Any  # int32: new tokens so far (the row's own step)
    done_B: Any  # bool: the row ended (or the slot is free)
    hash_B: Any  # uint32: the prompt's hash (random keys)
    sid_B: Any  # int32: the sample index (random keys)
    budget_B: Any  # int32: new tokens allowed

    @classmethod
    def empty(cls, B: int, V: int, R: int) -> Slots:
        """B free slots (host arrays)."""
        return cls(
            np.zeros((B, V), np.float32),
            np.zeros((B, V), bool),
            np.zeros((B, R), np.int32),
            np.zeros((B, R), np.float32),
            np.zeros((B,), np.int32),
            np.ones((B,), bool),
            np.zeros((B,), np.uint32),
            np.zeros((B,), np.int32),
            np.zeros((B,), np.int32),
        )


@_pytree
class Prefill:
    """P prefilled prompts: the logits after each prompt, the ids it holds, and its cache rows."""

    logits_PV: Any
    seen_PV: Any
    cache: KVCache


@_pytree
class Assignment:
    """One insert of prefilled rows into slots, M = B entries: row src_M[m] into slot slots_M[m] (B: no
    assignment, dropped) as sample sid_M[m] of prompt hash hash_M[m], with budget_M[m] new tokens."""

    slots_M: Any
    src_M: Any
    hash_M: Any
    sid_M: Any
    budget_M: Any

    @classmethod
    def of(cls, B: int, entries: list[tuple[int, int, int, int, int]]) -> Assignment:
        """From (slot, prefilled row, prompt hash, sid, budget) entries (host arrays)."""
        a = cls(
            np.full((B,), B, np.int32),
            np.zeros((B,), np.int32),
            np.zeros((B,), np.uint32),
            np.zeros((B,), np.int32),
            np.zeros((B,), np.int32),
        )
        for m, (slot, src, prompt_hash, sid, budget) in enumerate(entries):
            a.slots_M[m], a.src_M[m], a.hash_M[m], a.sid_M[m], a.budget_M[m] = slot, src, prompt_hash, sid, budget
        return a


# ------------------------------------------------------------------------------------------ device side


def _window(cache: KVCache, W: int) -> KVCache:
    """The first W slots of every layer's buffers (a copy: the decode loop then reads W slots only)."""
    return KVCache([b[..., :W] for b in cache.k], [b[:, :, :W] for b in cache.v], cache.end_B)


def _unwindow(cache: KVCache, win: KVCache) -> KVCache:
    """The window's slots written back into the whole cache (in place: the cache is donated)."""
    W = win.slots
    return KVCache(
        [b.at[..., :W].set(w) for b, w in zip(cache.k, win.k)],
        [b.at[:, :, :W].set(w) for b, w in zip(cache.v, win.v)],
        win.end_B,
    )


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
    # not fresh: every chunk, the first too, attends to the cache
    cache = init_cache(config, B, n * chunk + max_new).with_lengths(jnp.zeros((B,), jnp.int32))

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


def step_logits(params, layers, tokens_B, cache: KVCache, config: ModelConfig, live_B=None, kv_len=None):
    """One decode step: one token per row at the row's next cache slot (its position). Rows not
    `live_B` write a slot that is not counted (their length stays)."""
    mask_B1 = None if live_B is None else live_B[:, None]
    h_B1D, cache = hidden_states(
        params, tokens_B[:, None], config, attention_mask_BT=mask_B1, cache=cache, layers=layers, kv_len=kv_len
    )
    return unembed(params, h_B1D[:, 0], config), cache


def _prefill(params, layers, tokens_PT, mask_PT, *, config: ModelConfig) -> Prefill:
    logits_PV, cache = prefill_logits(params, layers, tokens_PT, mask_PT, config, 0)
    P, V = logits_PV.shape
    seen_PV = (
        jnp.zeros((P, V), bool).at[jnp.arange(P)[:, None], jnp.where(mask_PT, tokens_PT, V)].set(True, mode="drop")
    )
    return Prefill(logits_PV, seen_PV, cache)


def _insert(state: Slots, cache: KVCache, new: Prefill, a: Assignment) -> tuple[Slots, KVCache]:
    """Copy prefilled rows into slots as `a` assigns them, with each sample's settings."""
    T = new.cache.slots

    def put(buf, rows):
        return buf.at[a.slots_M].set(rows[a.src_M], mode="drop")

    cache = KVCache(
        [b.at[a.slots_M, :, :, :T].set(n[a.src_M], mode="drop") for b, n in zip(cache.k, new.cache.k)],
        [b.at[a.slots_M, :, :T].set(n[a.src_M], mode="drop") for b, n in zip(cache.v, new.cache.v)],
        put(cache.end_B, new.cache.end_B),
    )
    state = state.replace(
        logits_BV=put(state.logits_BV, new.logits_PV),
        seen_BV=put(state.seen_BV, new.seen_PV),
        count_B=state.count_B.at[a.slots_M].set(jnp.zeros_like(a.src_M), mode="drop"),
        done_B=state.done_B.at[a.slots_M].set(a.budget_M <= 0, mode="drop"),
        hash_B=state.hash_B.at[a.slots_M].set(a.hash_M, mode="drop"),
        sid_B=state.sid_B.at[a.slots_M].set(a.sid_M, mode="drop"),
        budget_B=state.budget_B.at[a.slots_M].set(a.budget_M, mode="drop"),
    )
    return state, cache


def _sample_step(state: Slots, sp: SamplingValues, eos_E):
    """Pick each live row's next token (at the row's own step count_B) and record it."""
    logits_BV, count_B = state.logits_BV, state.count_B
    keys_B = row_keys(sp.seed, state.hash_B, state.sid_B, count_B)
    penalized_BV = jax.lax.cond(
        sp.penalty != 1.0,
        lambda x: apply_repetition_penalty(x, state.seen_BV, sp.penalty),
        lambda x: x,
        logits_BV,
    )
    live_B = ~state.done_B
    tok_B = jnp.where(live_B, sample_logits(keys_B, penalized_BV, sp.temperature, sp.top_k, sp.top_p), 0)
    B, V = logits_BV.shape
    at_B = jnp.where(live_B, count_B, state.tokens_BR.shape[1])  # dead rows write nothing (dropped)
    new_count_B = count_B + live_B
    is_eos_B = jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)
    state = state.replace(
        tokens_BR=state.tokens_BR.at[jnp.arange(B), at_B].set(tok_B, mode="drop"),
        logprobs_BR=state.logprobs_BR.at[jnp.arange(B), at_B].set(token_logprobs(logits_BV, tok_B), mode="drop"),
        count_B=new_count_B,
        done_B=state.done_B | (live_B & (is_eos_B | (new_count_B >= state.budget_B))),
        seen_BV=state.seen_BV.at[jnp.arange(B), jnp.where(live_B, tok_B, V)].set(True, mode="drop"),
    )
    return state, tok_B, live_B


def _decode(params, layers, state: Slots, cache: KVCache, sp, eos_E, max_steps, stop_on_end, *, config, kv_len: int):
    """Decode steps until every row is done, `max_steps` steps ran, or (with `stop_on_end`) a row
    ended. Returns the state, the cache and the number of steps run.

    The steps run over a copy of the first `kv_len` slots (`_window`), written back once at the end:
    on XLA:CPU a slice of the cache inside the step is a copy of every layer's window at every step
    (BENCHMARKS.md, "Decode step profile"), so the window is cut once per chunk instead."""
    live0_B = ~state.done_B
    windowed = kv_len < cache.slots
    win = _window(cache, kv_len) if windowed else cache

    def cond(carry):
        state, _, steps = carry
        ended = jnp.any(live0_B & state.done_B)
        return (steps < max_steps) & ~jnp.all(state.done_B) & ~(stop_on_end & ended)

    def body(carry):
        state, cache, steps = carry
        state, tok_B, live_B = _sample_step(state, sp, eos_E)
        # The sampled token enters the cache at the row's next slot. After a row's last token this
        # forward is wasted for that row (its logits are never used), which keeps one loop body.
        logits_BV, cache = step_logits(params, layers, tok_B, cache, config, live_B=live_B)
        return state.replace(logits_BV=logits_BV), cache, steps + 1

    state, win, steps = jax.lax.while_loop(cond, body, (state, win, jnp.zeros((), jnp.int32)))
    return state, _unwindow(cache, win) if windowed else win, steps


def _refill_step(params, layers, state, cache, tokens_PT, mask_PT, assignment, *, config: ModelConfig):
    """Prefill P prompts and insert them into their slots: one executable per (P, T), not two. The
    prefilled rows come back too, for the samples of a prompt that did not fit (`Prefilled`)."""
    new = _prefill(params, layers, tokens_PT, mask_PT, config=config)
    return *_insert(state, cache, new, assignment), new


def _compact(state, cache, take_B):
    """The slots `take_B` (live rows first, then free ones) as a smaller engine: every per-slot array
    gathered to len(take_B) rows."""
    return jax.tree.map(lambda x: x[take_B], state), jax.tree.map(lambda x: x[take_B], cache)


_refill_jit = jax.jit(_refill_step, static_argnames=("config",), donate_argnames=("state", "cache"))
_insert_jit = jax.jit(_insert, donate_argnames=("state", "cache"))
_compact_jit = jax.jit(_compact)  # no donation: the outputs are smaller than the inputs
_decode_jit = jax.jit(_decode, static_argnames=("config", "kv_len"), donate_argnames=("state", "cache"))

# ------------------------------------------------------------------------------------------ executables

_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # JAX's event: one per program lowered
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", _LOWERED, "/jax/core/compile/backend_compile_duration")
_WATCHING: list[EngineStats] = []  # the stats that JAX's compile events go to while an executable is made


def _on_compile_event(event: str, duration: float, **_) -> None:
    for stats in _WATCHING:
        if event in _COMPILE_EVENTS:
            stats.compile_seconds += duration
            stats.compilations += event == _LOWERED


monitoring.register_event_duration_secs_listener(_on_compile_event)


class _Executables(collections.OrderedDict):
    """Compiled executables by (kind, shapes, backend), at most `maxsize` (least recently used dropped).
    What compiling one costs is counted from JAX's own compile events (jax.monitoring): a program JAX
    lowers counts as a compilation, one it already holds (a dropped executable asked for again) does not."""

    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def get(self, key: tuple, lower: Callable, stats: EngineStats):
        if key in self:
            self.move_to_end(key)
            return self[key]
        _WATCHING.append(stats)
        try:
            self[key] = lower().compile()
        finally:
            _WATCHING.remove(stats)
        if len(self) > self.maxsize:
            self.popitem(last=False)
        return self[key]


_EXECUTABLES = _Executables(MAX_EXECUTABLES)


def _avals(tree) -> tuple:
    return tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in jax.tree.leaves(tree))


# -------------------------------------------------------------------------------------------- host side


@dataclasses.dataclass
class Request:
    """One prompt: its token ids, `n` samples, each with `budget` new tokens at most."""

    ids: list[int]
    n: int
    budget: int
    prompt_hash: int  # the prompt's hash (random keys)


@dataclasses.dataclass
class Prefilled:
    """The last refill's prefilled rows, kept while samples of its prompts still wait: those samples
    are inserted from here, so a prompt is prefilled once whatever slots its samples land in."""

    prompts: list[int]  # request index of each prefilled row
    new: Prefill


@dataclasses.dataclass
class Refill:
    """The scheduler's decision for one refill: (slot, (request, sample)) placements, the prompts whose
    prefilled rows they copy (row p holds prompt prompts[p]), and whether those rows are the kept ones."""

    placed: list[tuple[int, tuple[int, int]]]
    prompts: list[int]
    reuse: bool


@dataclasses.dataclass
class Scheduler:
    """Host-side bookkeeping of one `run`, no device work: which sample each slot holds, which samples
    wait (longest prompts first: the long rows start early, the short ones fill in), what each slot's row
    has reported, and the prefilled rows kept for samples still waiting."""

    requests: list[Request]
    waiting: list[tuple[int, int]]  # (request, sample), in the order they get slots
    slot_row: list[tuple[int, int] | None]  # the sample each slot holds (None: free)
    reported_B: np.ndarray  # tokens of each slot's row already passed to on_progress
    kept: Prefilled | None = None
    prefill_tokens: int = PREFILL_TOKENS  # bound on a refill's P x T (`prefill_rows`)

    @classmethod
    def start(cls, requests: list[Request], slots: int, prefill_tokens: int = PREFILL_TOKENS) -> Scheduler:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
        waiting = [(i, j) for i in order for j in range(requests[i].n)]
        return cls(requests, waiting, [None] * slots, np.zeros((slots,), np.int64), prefill_tokens=prefill_tokens)

    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slot_row)

    def free(self) -> list[int]:
        return [b for b, r in enumerate(self.slot_row) if r is None]

    def live(self) -> list[int]:
        return [b for b, r in enumerate(self.slot_row) if r is not None]

    def next_refill(self) -> Refill | None:
        """Waiting samples into free slots (None: no slot free or nothing waits): those of the prompts the
        last refill prefilled go first, from its kept rows; else the next prompts, each prefilled once
        whatever its samples."""
        free = self.free()
        if not (free and self.waiting):
            return None
        kept = self.kept
        reuse = kept is not None and self.waiting[0][0] in kept.prompts
        take: list[tuple[int, int]] = []
        # new prompts: at most as many as `prefill_rows` allows (the first waiting is the longest)
        most = prefill_rows(len(self.requests[self.waiting[0][0]].ids), self.prefill_tokens)
        prompts: set[int] = set()
        while self.waiting and len(take) < len(free) and (not reuse or self.waiting[0][0] in kept.prompts):
            if not reuse and self.waiting[0][0] not in prompts and len(prompts) == most:
                break
            prompts.add(self.waiting[0][0])
            take.append(self.waiting.pop(0))
        prompts = kept.prompts if reuse else list(dict.fromkeys(i for i, _ in take))  # each prompt once, in order
        for b, row in zip(free, take):
            self.slot_row[b] = row
        self.reported_B[free] = 0
        return Refill(list(zip(free, take)), prompts, reuse)

    def refilled(self, refill: Refill, new: Prefill) -> None:
        """Keep the refill's prefilled rows while samples of its prompts still wait."""
        still = self.waiting and self.waiting[0][0] in refill.prompts
        self.kept = Prefilled(refill.prompts, new) if still else None

    def compaction(self, mesh: bool) -> np.ndarray | None:
        """The slots to keep (live first, then free ones: a power of two) once no prompt waits and half
        the slots or more are idle, so idle slots stop costing steps; None otherwise (and under a mesh,
        whose batch split needs the slot count)."""
        B, live = len(self.slot_row), self.live()
        if self.waiting or mesh or len(live) > B // 2:
            return None
        B = bucket(len(live), minimum=1, knee=B, step=B)
        take_B = np.asarray(live + self.free()[: B - len(live)])
        self.slot_row, self.reported_B = [self.slot_row[b] for b in take_B], self.reported_B[take_B]
        return take_B

    def finish(self, state: Slots, out: dict) -> tuple[int, int]:
        """Rows that ended leave their slots (their tokens and log-probs into `out`); returns (new tokens
        since the last report, rows finished). The log-probs are fetched only when a row ended."""
        done_B, count_B, tokens_BR = np.asarray(state.done_B), np.asarray(state.count_B), np.asarray(state.tokens_BR)
        occupied = self.live()
        new_tokens = int((count_B[occupied] - self.reported_B[occupied]).sum())
        self.reported_B[occupied] = count_B[occupied]
        finished = [b for b in occupied if done_B[b]]
        logprobs = np.asarray(state.logprobs_BR) if finished else None
        for b in finished:
            out[self.slot_row[b]] = (tokens_BR[b, : count_B[b]].tolist(), logprobs[b, : count_B[b]].tolist())
            self.slot_row[b] = None
        return new_tokens, len(finished)


@dataclasses.dataclass
class Device:
    """The engine's device calls, each one executable of `_EXECUTABLES` (compiled once per shape)."""

    params: Any
    layers: Any
    config: ModelConfig
    requests: list[Request]
    eos_E: np.ndarray
    pad_id: int
    stats: EngineStats

    def start(self, B: int, S: int, R: int) -> tuple[Slots, KVCache]:
        """B free slots and their cache of S slots per row, over the active mesh's batch axes if any
        (every process passes the same values)."""
        state, end_B = put_batch((Slots.empty(B, self.config.vocab_size, R), np.zeros((B,), np.int32)))
        return state, init_cache(self.config, B, S).with_lengths(end_B)

    def refill(self, state: Slots, cache: KVCache, refill: Refill, kept: Prefilled | None):
        """Run `refill`: its samples inserted from the kept prefilled rows, or their prompts prefilled
        (P a power of two, T bucketed) and inserted in one call. Returns the state, the cache and the
        prefilled rows."""
        B, requests = len(state.done_B), self.requests
        entries = [
            (b, refill.prompts.index(i), requests[i].prompt_hash, j, requests[i].budget) for b, (i, j) in refill.placed
        ]
        assignment = Assignment.of(B, entries)
        if refill.reuse:
            args = (state, cache, kept.new, assignment)
            insert = self.executable("insert", (_avals(args[:3]),), lambda: _insert_jit.lower(*args))
            return (*insert(*args), kept.new)
        P = min(bucket(len(refill.prompts), minimum=1, knee=B, step=B), B)
        T = bucket(max(len(requests[i].ids) for i in refill.prompts), **PREFILL_BUCKETS)
        tokens_PT = np.full((P, T), self.pad_id, np.int32)
        mask_PT = np.zeros((P, T), bool)
        mask_PT[len(refill.prompts) :, 0] = True  # filler rows: one token, never inserted
        for p, i in enumerate(refill.prompts):
            tokens_PT[p, : len(requests[i].ids)] = requests[i].ids
            mask_PT[p, : len(requests[i].ids)] = True
        args = (self.params, self.layers, state, cache, tokens_PT, mask_PT, assignment)
        key = (self.config, _avals(args[:4]), P, T)
        prefill = self.executable("prefill", key, lambda: _refill_jit.lower(*args, config=self.config))
        self.stats.prefilled_prompts += len(refill.prompts)
        self.stats.prefill_calls += 1
        return prefill(*args)

    def compact(self, state: Slots, cache: KVCache, take_B: np.ndarray) -> tuple[Slots, KVCache]:
        args = (state, cache, take_B)
        compact = self.executable("compact", (_avals(args[:2]), len(take_B)), lambda: _compact_jit.lower(*args))
        return compact(*args)

    def decode(self, state: Slots, cache: KVCache, sp: SamplingValues, W: int, steps: int, stop_on_end: bool):
        """Up to `steps` decode steps attending to the first W cache slots (stopping when a row ends with
        `stop_on_end`): the state, the cache and the steps run."""
        params, layers, config, eos_E = self.params, self.layers, self.config, self.eos_E
        key = (config, _avals((params, layers, state, cache)), W, eos_E.shape)
        decode = self.executable(
            "decode",
            key,
            lambda: _decode_jit.lower(
                params, layers, state, cache, sp, eos_E, np.int32(0), np.bool_(False), config=config, kv_len=W
            ),
        )
        state, cache, n = decode(params, layers, state, cache, sp, eos_E, np.int32(steps), np.bool_(stop_on_end))
        n = int(n)
        self.stats.decode_steps += n
        self.stats.slot_steps += n * len(state.done_B)
        return state, cache

    def executable(self, kind: str, key: tuple, lower: Callable):
        return _EXECUTABLES.get((kind, *key, jax.default_backend()), lower, self.stats)


def decode_window(end_B: np.ndarray, live: list[int], chunk: int, S: int) -> tuple[int, int]:
    """(W, steps) of the next decode chunk: W attended slots, the longest live row plus the chunk bucketed,
    when that is at most S / 2 (a window is copied in and out once per chunk: only worth it when small),
    else S; at most `chunk` steps, fewer where a live row would outgrow W (each step writes at its end)."""
    max_end = int(end_B[live].max())
    W = bucket(max_end + chunk, **WINDOW_BUCKETS)
    W = W if 2 * W <= S else S
    return W, min(chunk, W - max_end)


def run(
    params,
    layers,
    config: ModelConfig,
    requests: list[Request],
    sp: SamplingValues,
    eos: tuple[int, ...],
    *,
    slots: int,
    chunk: int,
    pad_id: int,
    stats: EngineStats,
    stop_check: Callable[[list[int]], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    prefill_tokens: int = PREFILL_TOKENS,
):
    """Generate every sample of every request. Returns {(request index, sample): (token ids, logprobs)}.

    `stop_check(ids)` (stop strings) is asked between chunks about each live row's output;
    `on_progress(new_tokens, finished_rows)` after each chunk."""
    R = bucket(max(r.budget for r in requests), **OUTPUT_BUCKETS)
    S = bucket(max(len(r.ids) for r in requests), **PREFILL_BUCKETS) + R
    device = Device(params, layers, config, requests, np.asarray(eos, np.int32), pad_id, stats)
    state, cache = device.start(slots, S, R)
    sched = Scheduler.start(requests, slots, prefill_tokens)
    out: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
    while sched.busy():
        while (refill := sched.next_refill()) is not None:
            state, cache, new = device.refill(state, cache, refill, sched.kept)
            sched.refilled(refill, new)
        take_B = sched.compaction(mesh=active() is not None)
        if take_B is not None:
            state, cache = device.compact(state, cache, take_B)
        W, steps = decode_window(np.asarray(cache.end_B), sched.live(), chunk, S)
        state, cache = device.decode(state, cache, sp, W, steps, stop_on_end=bool(sched.waiting))
        state = _stop_strings(state, sched, stop_check)
        new_tokens, finished = sched.finish(state, out)
        if on_progress is not None:
            on_progress(new_tokens, finished)
    return out


def _stop_strings(state: Slots, sched: Scheduler, stop_check) -> Slots:
    """Rows whose output `stop_check` says has reached a stop string end now (asked between chunks)."""
    if stop_check is None:
        return state
    done_B, count_B, tokens_BR = np.array(state.done_B), np.asarray(state.count_B), np.asarray(state.tokens_BR)
    for b in sched.live():
        if not done_B[b] and stop_check(tokens_BR[b, : count_B[b]].tolist()):
            done_B[b] = True
    return state.replace(done_B=jax.device_put(done_B, state.done_B.sharding))
