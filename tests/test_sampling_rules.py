"""The pure sampling rules (lidr_jax.sampling.rules) on small vocabularies: exclusion, empirical frequencies
(chi-square with a fixed seed), and agreement with transformers' logits processors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidr_jax.sampling.rules import apply_repetition_penalty, filter_top_k_top_p, row_keys, sample_logits

LOGITS_V = np.asarray([2.0, 1.5, 1.4, 0.9, 0.5, 0.3, 0.0, -0.2, -0.8, -1.0, -1.5, -3.0], np.float32)


def expected_distribution(logits_V, temperature, top_k, top_p):
    """Reference in numpy, index-based as transformers does it: softmax(logits / T), keep the top k,
    then the smallest prefix (by probability) whose mass reaches top_p, renormalise."""
    order = np.argsort(-logits_V, kind="stable")
    p = np.exp(logits_V / temperature - np.max(logits_V / temperature))
    keep = np.zeros(len(p), bool)
    keep[order[: top_k or len(p)]] = True
    q = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
    mass_before = 0.0
    nucleus = np.zeros(len(p), bool)
    for i in order:
        if keep[i] and (mass_before < top_p or not nucleus.any()):
            nucleus[i] = True
            mass_before += q[i]
    r = np.where(nucleus, q, 0.0)
    return r / r.sum()


def chi2_critical(df: int, z: float = 3.090) -> float:
    """Upper 0.999 quantile of chi-square(df) by the Wilson-Hilferty approximation (z of 0.999)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def draw(logits_V, temperature, top_k, top_p, n=20000, seed=0):
    keys_B = jax.random.split(jax.random.key(seed), n)
    logits_BV = jnp.broadcast_to(jnp.asarray(logits_V), (n, len(logits_V)))
    fn = jax.jit(sample_logits)
    return np.asarray(fn(keys_B, logits_BV, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 5, 1.0), (1.0, 0, 0.7), (1.3, 6, 0.85), (0.6, 3, 0.5)]
)
def test_frequencies_match_renormalised_distribution(temperature, top_k, top_p):
    expected_V = expected_distribution(LOGITS_V, temperature, top_k, top_p)
    tokens = draw(LOGITS_V, temperature, top_k, top_p)
    counts_V = np.bincount(tokens, minlength=len(LOGITS_V))
    allowed = expected_V > 0
    assert counts_V[~allowed].sum() == 0, f"excluded tokens were drawn: {np.flatnonzero(counts_V * ~allowed)}"
    expected_counts = expected_V[allowed] * len(tokens)
    chi2 = float(np.sum((counts_V[allowed] - expected_counts) ** 2 / expected_counts))
    df = int(allowed.sum()) - 1
    if df > 0:
        assert chi2 < chi2_critical(df), f"chi2={chi2:.1f} over df={df}"


def test_top_k_and_top_p_never_emit_excluded_tokens_on_random_logits():
    logits_BV = jax.random.normal(jax.random.key(3), (64, 40)) * 3
    keys_B = jax.random.split(jax.random.key(4), 64)
    sample, keep = jax.jit(sample_logits), jax.jit(filter_top_k_top_p)
    fold = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
    for top_k, top_p in [(1, 1.0), (4, 1.0), (0, 0.3), (10, 0.6)]:
        kept_BV = np.isfinite(np.asarray(keep(logits_BV, jnp.int32(top_k), jnp.float32(top_p))))
        for step in range(8):
            keys = fold(keys_B, step)
            tok_B = np.asarray(sample(keys, logits_BV, jnp.float32(1.0), jnp.int32(top_k), jnp.float32(top_p)))
            assert kept_BV[np.arange(64), tok_B].all()
            if top_k:
                assert (kept_BV.sum(-1) <= top_k).all()


def test_greedy_ignores_keys_and_filters():
    logits_BV = jax.random.normal(jax.random.key(5), (8, 30))
    keys_B = jax.random.split(jax.random.key(6), 8)
    tok_B = sample_logits(keys_B, logits_BV, jnp.float32(0.0), jnp.int32(3), jnp.float32(0.5))
    np.testing.assert_array_equal(np.asarray(tok_B), np.argmax(np.asarray(logits_BV), -1))


def test_filters_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits_BV = np.asarray(jax.random.normal(jax.random.key(7), (16, 50)) * 2, np.float32)
    for top_k, top_p in [(5, 1.0), (0, 0.8), (12, 0.6), (50, 0.95)]:
        ref = torch.from_numpy(logits_BV.copy())
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ours = np.asarray(filter_top_k_top_p(jnp.asarray(logits_BV), top_k, top_p))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref.numpy()))
        np.testing.assert_array_equal(ours[np.isfinite(ours)], logits_BV[np.isfinite(ours)])


def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits_BV = np.asarray(jax.random.normal(jax.random.key(8), (3, 20)), np.float32)
    ids = np.asarray([[1, 2, 2, 7], [0, 19, 5, 5], [3, 3, 3, 3]])
    seen_BV = np.zeros((3, 20), bool)
    seen_BV[np.arange(3)[:, None], ids] = True
    for penalty in (1.1, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(ids), torch.from_numpy(logits_BV.copy()))
        ours = apply_repetition_penalty(jnp.asarray(logits_BV), jnp.asarray(seen_BV), jnp.float32(penalty))
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6, atol=0)
    unchanged = apply_repetition_penalty(jnp.asarray(logits_BV), jnp.asarray(seen_BV), jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(unchanged), logits_BV)


def test_row_keys_depend_on_content_not_position():
    pids = jnp.asarray([11, 22, 33], jnp.uint32)
    sids = jnp.asarray([0, 1, 0], jnp.int32)
    all3 = jax.random.key_data(row_keys(jnp.uint32(5), pids, sids, 4))
    alone = jax.random.key_data(row_keys(jnp.uint32(5), pids[1:2], sids[1:2], 4))
    np.testing.assert_array_equal(np.asarray(all3[1]), np.asarray(alone[0]))
    keys = [
        np.asarray(jax.random.key_data(row_keys(jnp.uint32(s), pids, sids, t)))[0] for s, t in [(5, 4), (6, 4), (5, 5)]
    ]
    assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[0], keys[2])
    assert not np.array_equal(np.asarray(all3[0]), np.asarray(all3[2]))
