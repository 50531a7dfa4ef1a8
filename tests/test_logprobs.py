"""Sequence log-probs, plain rows and packed pairs: equal to a plain forward's per-token log-probs
summed over the response; the prompt and the padding contribute nothing; chunking changes nothing
(values, gradients); a packed pair (prompt run once) equals its two separate rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dpo_helpers import PAIRS, tiny_model

from lidr_jax.model.llama import forward, hidden_states
from lidr_jax.model.logprobs import pair_logprobs, target_logprobs
from lidr_jax.train.pairs import PreferencePair, encode_pairs, pair_batch

TOL = 1e-5  # float32, sums of ~20 log-probs


def scoring_batch(prompt_ids, response_ids, pad_id: int, length: int) -> dict[str, np.ndarray]:
    """[B, length] plain rows, the reference layout the packed one is checked against: tokens, next-token
    targets, a target mask that is 1 exactly on response tokens, and the attention mask (right padding)."""
    B = len(prompt_ids)
    tokens = np.full((B, length), pad_id, np.int32)
    response = np.zeros((B, length), bool)
    attention = np.zeros((B, length), bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        n = len(p) + len(r)
        if n > length:
            raise ValueError(f"a row of {n} tokens does not fit the batch length {length}")
        tokens[b, :n] = np.asarray(list(p) + list(r), np.int32)
        response[b, len(p) : n] = True
        attention[b, :n] = True
    targets = np.concatenate([tokens[:, 1:], np.full((B, 1), pad_id, np.int32)], axis=1)
    target_mask = np.concatenate([response[:, 1:], np.zeros((B, 1), bool)], axis=1)
    return {"tokens": tokens, "targets": targets, "target_mask": target_mask, "attention_mask": attention}


def sequence_logprobs(params, batch, config, *, chunk: int = 256, remat: str = "none"):
    """Summed log-prob of the target tokens of plain rows (`scoring_batch`) where `target_mask` is set,
    and their count: (logp_B, count_B) float32."""
    h_BTD, _ = hidden_states(params, batch["tokens"], config, attention_mask_BT=batch["attention_mask"], remat=remat)
    mask = batch["target_mask"].astype(bool)
    tok = target_logprobs(params, h_BTD, batch["targets"], config, chunk=chunk)
    return jnp.sum(jnp.where(mask, tok, 0.0), axis=-1), jnp.sum(mask, axis=-1).astype(jnp.float32)


# One jitted function each for every test: same shapes hit the compile cache.
_logp = jax.jit(sequence_logprobs, static_argnames=("config", "chunk", "remat"))
_pair = jax.jit(pair_logprobs, static_argnames=("config", "chunk", "remat"))


@pytest.fixture(scope="module")
def setup():
    config, params, tok = tiny_model()
    enc = encode_pairs([PreferencePair(*p) for p in PAIRS[:4]], tok, max_prompt_len=64, max_response_len=64)
    return config, params, tok, enc


def unpacked_rows(enc, indices, length=64, pad_id=0):
    """Chosen rows then rejected rows, each prompt + answer on its own ([2B, T] for sequence_logprobs)."""
    prompts = [enc.prompt_ids[i] for i in indices] * 2
    answers = [enc.chosen_ids[i] for i in indices] + [enc.rejected_ids[i] for i in indices]
    return scoring_batch(prompts, answers, pad_id, length)


@pytest.fixture(scope="module")
def plain(setup):
    """Per-row (sum of response-token log-probs, response length) from a plain forward's logits,
    summed by hand in NumPy: rows 0-3 chosen, 4-7 rejected."""
    config, params, _, enc = setup
    batch = unpacked_rows(enc, [0, 1, 2, 3])
    logits = np.asarray(
        jax.jit(lambda p, t, m: forward(p, t, config, attention_mask_BT=m))(
            params, batch["tokens"], batch["attention_mask"]
        )
    ).astype(np.float64)
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


def _close(got, want):
    return abs(float(got) - want) <= TOL * max(1.0, abs(want))


@pytest.mark.parametrize("chunk", [0, 8, 5])
def test_sequence_logprobs_equal_plain_forward_sum_over_response(setup, plain, chunk):
    config, params, _, enc = setup
    batch, want = plain
    logp, count = _logp(params, batch, config=config, chunk=chunk)
    for row, (w, n) in enumerate(want):
        assert _close(logp[row], w), row
        assert float(count[row]) == n


@pytest.mark.parametrize("chunk", [0, 8, 5])
def test_packed_pairs_equal_their_separate_rows(setup, plain, chunk):
    config, params, _, enc = setup
    _, want = plain
    batch = pair_batch(enc, [0, 1, 2, 3], pad_id=0)
    logp_c, logp_r, count_c = _pair(params, batch, config=config, chunk=chunk)
    for i in range(4):
        assert _close(logp_c[i], want[i][0]), i
        assert _close(logp_r[i], want[4 + i][0]), i
        assert float(count_c[i]) == want[i][1]


def test_packed_layout(setup):
    """One row per pair: prompt | chosen | rejected; the rejected answer's positions continue the
    prompt; each answer's first token is scored at the prompt's last position."""
    _, _, _, enc = setup
    b = pair_batch(enc, [1], pad_id=0, batch_size=2)
    p, c, r = enc.prompt_ids[1], enc.chosen_ids[1], enc.rejected_ids[1]
    P, C, R = len(p), len(c), len(r)
    assert b["tokens"].shape[0] == 2 and b["weight"].tolist() == [1.0, 0.0]
    assert b["tokens"][0, : P + C + R].tolist() == np.concatenate([p, c, r]).tolist()
    assert (b["tokens"][0, P + C + R :] == 0).all() and not b["attention_mask"][0, P + C + R :].any()
    assert b["positions"][0, : P + C + R].tolist() == list(range(P + C)) + list(range(P, P + R))
    assert b["segments"][0, : P + C + R].tolist() == [0] * P + [1] * C + [2] * R
    assert b["logit_index"][0, 0] == P - 1 and b["logit_index"][0, C] == P - 1
    assert b["targets"][0, : C + R].tolist() == np.concatenate([c, r]).tolist()
    assert b["chosen_mask"][0].sum() == C and b["rejected_mask"][0].sum() == R
    assert not (b["chosen_mask"][0] & b["rejected_mask"][0]).any()


def test_padding_contributes_nothing(setup):
    config, params, _, enc = setup
    short = pair_batch(enc, [0, 1, 2, 3], pad_id=0)
    T, E = short["tokens"].shape[1], short["targets"].shape[1]
    long = pair_batch(enc, [0, 1, 2, 3], pad_id=0, length=2 * T, entries=2 * E)
    other_pad = pair_batch(enc, [0, 1, 2, 3], pad_id=7, length=2 * T, entries=2 * E)
    got = [np.stack(_pair(params, x, config=config, chunk=8)[:2]) for x in (short, long, other_pad)]
    for g in got[1:]:
        np.testing.assert_allclose(g, got[0], rtol=0, atol=TOL * np.abs(got[0]).max())
    a = np.asarray(_logp(params, unpacked_rows(enc, [0, 1, 2, 3], length=64), config=config, chunk=8)[0])
    b = np.asarray(_logp(params, unpacked_rows(enc, [0, 1, 2, 3], length=128, pad_id=7), config=config, chunk=8)[0])
    np.testing.assert_allclose(b, a, rtol=0, atol=TOL * np.abs(a).max())


def test_prompt_tokens_are_not_counted(setup):
    config, params, _, enc = setup
    batch = unpacked_rows(enc, [0, 1, 2, 3])
    np.testing.assert_array_equal(batch["target_mask"].sum(-1), [len(r) for r in enc.chosen_ids + enc.rejected_ids])
    logp = float(_logp(params, batch, config=config, chunk=8)[0][0])
    # Unmasking the prompt targets changes the sum: so the mask, not luck, keeps the prompt out.
    with_prompt = dict(
        batch,
        target_mask=batch["attention_mask"]
        & (np.arange(batch["tokens"].shape[1]) < batch["attention_mask"].sum(-1, keepdims=True) - 1),
    )
    assert float(_logp(params, with_prompt, config=config, chunk=8)[0][0]) < logp - 1.0


def _max_close(a, b, rel=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=rel * float(np.abs(x).max() + 1e-12))


def test_chunked_and_unchunked_gradients_match(setup):
    config, params, _, enc = setup
    batch = pair_batch(enc, [0, 1, 2], pad_id=0)

    def loss(p, c):
        return jnp.sum(jnp.stack(pair_logprobs(p, batch, config, chunk=c)[:2]) * jnp.array([[1.0], [-0.5]]))

    grads = [jax.jit(jax.grad(lambda p, c=c: loss(p, c)))(params) for c in (0, 8)]
    _max_close(grads[0], grads[1])


def test_packed_and_separate_rows_give_the_same_gradients(setup):
    """The backward pass through the shared prompt equals the sum of the two rows' backward passes."""
    config, params, _, enc = setup
    packed, rows = pair_batch(enc, [0, 1, 2], pad_id=0), unpacked_rows(enc, [0, 1, 2])
    w = jnp.array([1.0, 2.0, 3.0, -1.0, -0.5, 0.25])  # per-answer weights, as a DPO loss gives them
    g_packed = jax.jit(jax.grad(lambda p: jnp.sum(jnp.concatenate(pair_logprobs(p, packed, config)[:2]) * w)))(params)
    g_rows = jax.jit(jax.grad(lambda p: jnp.sum(sequence_logprobs(p, rows, config)[0] * w)))(params)
    _max_close(g_rows, g_packed)


def test_chunking_never_materialises_full_logits(setup):
    """The jaxpr of the chunked version holds no [B, E, V] float32 array."""
    config, params, _, enc = setup
    batch = pair_batch(enc, [0, 1], pad_id=0)
    B, E = batch["targets"].shape
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(pair_logprobs(p, batch, config, chunk=8)[0])))(params)
    shapes = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")}
    assert (B, E, config.vocab_size) not in shapes
    assert (E // 8, B, 8, config.vocab_size) not in shapes
