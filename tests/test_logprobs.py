"""Chunked sequence log-probs: equal to a plain forward's per-token log-probs summed over the
response; the prompt and the padding contribute nothing; chunking changes nothing (values, grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dpo_helpers import PAIRS, tiny_model

from lidr_jax.data import PreferencePair, encode_pairs, pair_batch
from lidr_jax.dpo import sequence_logprobs
from lidr_jax.model import forward

TOL = 1e-5  # float32, sums of ~20 log-probs
# One jitted function for every test: same shapes hit the compile cache.
_logp = jax.jit(sequence_logprobs, static_argnames=("config", "chunk", "remat"))


@pytest.fixture(scope="module")
def setup():
    config, params, tok = tiny_model()
    enc = encode_pairs([PreferencePair(*p) for p in PAIRS[:4]], tok, max_prompt_len=64, max_response_len=64)
    return config, params, tok, enc


@pytest.fixture(scope="module")
def plain(setup):
    """Per-row (sum of response-token log-probs, response length) from a plain forward's logits,
    summed by hand in NumPy. Rows are right padded, and causal attention keeps padding after a
    row's last token from touching it."""
    config, params, _, enc = setup
    batch = pair_batch(enc, [0, 1, 2, 3], pad_id=0)
    logits = np.asarray(jax.jit(lambda p, t, m: forward(p, t, config, attention_mask_BT=m))(
        params, batch["tokens"], batch["attention_mask"])).astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    out = []
    for row in range(8):
        i = row % 4
        p = enc.prompt_ids[i]
        r = (enc.chosen_ids if row < 4 else enc.rejected_ids)[i]
        seq = np.concatenate([p, r])
        # token seq[t] is predicted at position t - 1; response tokens are t >= len(p)
        out.append((sum(logp[row, t - 1, seq[t]] for t in range(len(p), len(seq))), len(r)))
    return batch, out


@pytest.mark.parametrize("chunk", [0, 8, 5])
def test_equals_plain_forward_sum_over_response(setup, plain, chunk):
    config, params, _, enc = setup
    batch, want = plain
    logp, count = _logp(params, batch, config=config, chunk=chunk)
    for row, (w, n) in enumerate(want):
        assert abs(float(logp[row]) - w) <= TOL * max(1.0, abs(w)), row
        assert float(count[row]) == n


def test_padding_contributes_nothing(setup):
    config, params, _, enc = setup
    short = pair_batch(enc, [0, 1, 2, 3], pad_id=0)
    long = pair_batch(enc, [0, 1, 2, 3], pad_id=0, length=short["tokens"].shape[1] * 2)
    other_pad = pair_batch(enc, [0, 1, 2, 3], pad_id=7, length=short["tokens"].shape[1] * 2)
    a, b, c = (np.asarray(_logp(params, x, config=config, chunk=8)[0]) for x in (short, long, other_pad))
    np.testing.assert_allclose(b, a, rtol=0, atol=TOL * np.abs(a).max())
    np.testing.assert_allclose(c, a, rtol=0, atol=TOL * np.abs(a).max())


def test_prompt_tokens_are_not_counted(setup):
    config, params, _, enc = setup
    batch = pair_batch(enc, [0, 1, 2, 3], pad_id=0)
    np.testing.assert_array_equal(batch["target_mask"].sum(-1), [len(r) for r in enc.chosen_ids + enc.rejected_ids])
    logp = float(_logp(params, batch, config=config, chunk=8)[0][0])
    # Unmasking the prompt targets changes the sum: so the mask, not luck, keeps the prompt out.
    with_prompt = dict(batch, target_mask=batch["attention_mask"] & (np.arange(batch["tokens"].shape[1]) <
                                                                     batch["attention_mask"].sum(-1, keepdims=True) - 1))
    assert float(_logp(params, with_prompt, config=config, chunk=8)[0][0]) < logp - 1.0


def test_chunked_and_unchunked_gradients_match(setup):
    config, params, _, enc = setup
    batch = pair_batch(enc, [0, 1, 2], pad_id=0)
    grads = [jax.jit(jax.grad(lambda p, c=c: jnp.sum(sequence_logprobs(p, batch, config, chunk=c)[0])))(params)
             for c in (0, 8)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * float(np.abs(a).max() + 1e-12))


def test_chunking_never_materialises_full_logits(setup):
    """The jaxpr of the chunked version holds no [B, T, V] float32 array."""
    config, params, _, enc = setup
    batch = pair_batch(enc, [0, 1], pad_id=0)
    B, T = batch["tokens"].shape
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(sequence_logprobs(p, batch, config, chunk=8)[0])))(params)
    shapes = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")}
    assert (B, T, config.vocab_size) not in shapes
    assert (T // 8, B, 8, config.vocab_size) not in shapes
