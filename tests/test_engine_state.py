"""Typed generation state: the KV cache's static "fresh" flag, forward's one return type, the engine's
bounded executables (compilations counted from JAX's compile events) and its host-side scheduler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dpo_helpers import tiny_model

from lidr_jax.model.llama import KVCache, forward, forward_cached, init_cache
from lidr_jax.sampling.engine import EngineStats, Request, Scheduler, Slots, _Executables, prefill_rows


def test_fresh_is_part_of_the_cache_structure_not_a_value():
    config, params, _ = tiny_model()
    fresh = init_cache(config, 2, 8)
    assert isinstance(fresh, KVCache) and fresh.fresh and fresh.slots == 8
    used = fresh.with_lengths(jnp.asarray([3, 5], jnp.int32))
    assert not used.fresh and used.end_B.tolist() == [3, 5]
    # the flag is static: a fresh and a used cache are two pytree structures with the same 2L + 1 leaves
    assert jax.tree.structure(fresh) != jax.tree.structure(used)
    assert len(jax.tree.leaves(fresh)) == len(jax.tree.leaves(used)) == 2 * config.num_hidden_layers + 1
    tokens = np.asarray([[5, 6, 7], [8, 9, 0]], np.int32)
    mask = np.asarray([[1, 1, 1], [1, 1, 0]], bool)
    logits, after = forward_cached(params, tokens, config, fresh, attention_mask_BT=mask)
    assert not after.fresh and after.end_B.tolist() == [3, 2]
    np.testing.assert_allclose(logits, forward(params, tokens, config, attention_mask_BT=mask), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="forward takes no cache; forward_cached returns"):
        forward(params, tokens, config, cache=fresh)


def test_executables_are_bounded_and_counted_from_jax_compile_events():
    f = jax.jit(lambda x: jnp.sin(x) * 3 + 1)
    cache, stats = _Executables(maxsize=2), EngineStats()
    args = {n: np.zeros((n, 7), np.float32) for n in (1, 2, 3)}
    for n in (1, 2, 3):
        cache.get(("f", n), lambda n=n: f.lower(args[n]), stats)
    assert list(cache) == [("f", 2), ("f", 3)]  # the least recently used dropped
    assert stats.compilations == 3 and stats.compile_seconds > 0
    cache.get(("f", 2), lambda: pytest.fail("a kept executable is not lowered again"), stats)
    assert list(cache) == [("f", 3), ("f", 2)]
    # the dropped one asked for again: JAX still holds its program, so nothing is lowered or counted
    again = cache.get(("f", 1), lambda: f.lower(args[1]), stats)
    assert stats.compilations == 3 and list(cache) == [("f", 2), ("f", 1)]
    np.testing.assert_allclose(again(np.ones((1, 7), np.float32)), np.sin(1.0) * 3 + 1, rtol=1e-6)


def _slots(done, count, tokens):
    B, R = np.shape(tokens)
    return Slots.empty(B, 4, R).replace(
        done_B=np.asarray(done, bool), count_B=np.asarray(count, np.int32), tokens_BR=np.asarray(tokens, np.int32)
    )


def test_scheduler_places_refills_keeps_prefills_compacts_and_finishes():
    requests = [Request([1, 2], 2, 5, 11), Request([1, 2, 3, 4], 3, 5, 12), Request([9], 1, 5, 13)]
    sched = Scheduler.start(requests, 4)
    assert sched.waiting == [(1, 0), (1, 1), (1, 2), (0, 0), (0, 1), (2, 0)]  # longest prompt first
    first = sched.next_refill()
    assert first.placed == [(0, (1, 0)), (1, (1, 1)), (2, (1, 2)), (3, (0, 0))]
    assert first.prompts == [1, 0] and not first.reuse
    sched.refilled(first, "rows of prompts 1, 0")  # (0, 1) still waits: prompt 0's rows are kept
    assert sched.kept.prompts == [1, 0] and sched.next_refill() is None  # no slot free
    # slots 1 and 3 end; the other rows go on
    out = {}
    new, finished = sched.finish(_slots([0, 1, 0, 1], [2, 3, 1, 2], [[7, 7, 0], [8, 8, 8], [6, 0, 0], [5, 5, 0]]), out)
    assert (new, finished) == (8, 2) and set(out) == {(1, 1), (0, 0)} and out[(1, 1)][0] == [8, 8, 8]
    second = sched.next_refill()  # the kept rows serve prompt 0's second sample; prompt 2 waits for its prefill
    assert second.placed == [(1, (0, 1))] and second.prompts == [1, 0] and second.reuse
    sched.refilled(second, "same rows")
    assert sched.kept is None  # nothing of prompts 1, 0 waits any more
    third = sched.next_refill()
    assert third.placed == [(3, (2, 0))] and third.prompts == [2] and not third.reuse
    sched.refilled(third, "rows of prompt 2")
    # tokens are reported once: a refilled slot starts from 0
    new, finished = sched.finish(_slots([1, 0, 1, 0], [3, 1, 2, 1], [[7, 7, 7], [4, 0, 0], [6, 6, 0], [3, 0, 0]]), out)
    assert (new, finished) == (4, 2) and out[(1, 0)][0] == [7, 7, 7] and out[(1, 2)][0] == [6, 6]
    # two live rows of four slots, nothing waits: they move into slots 0, 1
    assert sched.compaction(mesh=True) is None
    assert sched.compaction(mesh=False).tolist() == [1, 3]
    assert sched.slot_row == [(0, 1), (2, 0)] and sched.reported_B.tolist() == [1, 1]
    new, finished = sched.finish(_slots([1, 1], [2, 1], [[4, 4], [3, 0]]), out)
    assert (new, finished) == (1, 2) and not sched.busy() and len(out) == 6


def test_prefill_rows_bound_a_refill_by_its_tokens():
    """A refill prefills at most the largest power of two of prompts whose bucketed length fits the budget
    (the paper configs' 5,792-token prompts: 4 at a time, not a refill of all 256 slots)."""
    assert [prefill_rows(100), prefill_rows(5792), prefill_rows(40000), prefill_rows(100, 256)] == [256, 4, 1, 2]
    requests = [Request([1] * 100, 1, 5, 1), Request([1] * 90, 1, 5, 2), Request([1] * 80, 2, 5, 3)]
    sched = Scheduler.start(requests, 4, prefill_tokens=256)  # rows of 128 tokens: two prompts per refill
    first = sched.next_refill()
    assert first.prompts == [0, 1] and [b for b, _ in first.placed] == [0, 1]
    sched.refilled(first, "rows of prompts 0, 1")
    second = sched.next_refill()  # two slots still free: prompt 2's two samples
    assert second.prompts == [2] and second.placed == [(2, (2, 0)), (3, (2, 1))]
