"""Sampling rules as pure functions over logits: repetition penalty, temperature, top-k, top-p, draw.

Every setting is a traced scalar, never a static argument, so changing a temperature or a top-p does
not recompile the decode loop. The order and the semantics follow transformers' logits processors
(`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`)
so that greedy decoding is token-identical to `transformers.generate(do_sample=False)`.

Shape key: B rows, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_repetition_penalty(logits_BV, seen_BV, penalty):
    """Transformers' (CTRL) repetition penalty: for every token id already present in the prompt or the
    output, a positive logit is divided by `penalty` and a negative one multiplied by it. 1.0 = off."""
    penalized = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalized, logits_BV)


def filter_top_k_top_p(logits_BV, top_k, top_p):
    """Set every token outside the top-k, then outside the top-p nucleus, to -inf.

    `top_k` <= 0 or >= V keeps all tokens; `top_p` >= 1 keeps all. As in transformers, the nucleus is
    the smallest set of highest-probability tokens whose mass reaches `top_p` (at least one token), and
    top-p is measured on the distribution already restricted to the top-k. Tokens tied with the last
    kept value are kept too (a threshold, not an index, decides), which only matters for exact ties.
    """
    V = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    k = jnp.where((top_k <= 0) | (top_k > V), V, top_k)
    kth_B1 = jnp.take_along_axis(sorted_BV, jnp.full(sorted_BV.shape[:-1] + (1,), k - 1), axis=-1)
    rank_V = jnp.arange(V)
    sorted_BV = jnp.where(rank_V < k, sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # The first token is always kept; a later one only while the mass before it is below top_p.
    keep_BV = (mass_before_BV < top_p) | (rank_V == 0)
    n_keep_B1 = jnp.sum(keep_BV & (rank_V < k), axis=-1, keepdims=True)
    pth_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    threshold_B1 = jnp.maximum(kth_B1, pth_B1)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def first_argmax(x_BV):
    """The index of each row's largest value, the first one on ties: `jnp.argmax` without its variadic
    (value, index) reduction, which XLA:CPU ran several times slower than a max then a min of the indices
    (BENCHMARKS.md, "Decode step profile", has the measurement)."""
    V = x_BV.shape[-1]
    at_max_BV = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(at_max_BV, jnp.arange(V, dtype=jnp.int32), V), axis=-1), V - 1)


def sample_logits(keys_B, logits_BV, temperature, top_k, top_p):
    """One token per row. temperature <= 0 is greedy (argmax, the other settings ignored); otherwise
    logits / temperature, then top-k and top-p, then a draw with the row's own key (Gumbel-max, which
    samples exactly from the softmax of the filtered logits)."""

    def greedy(_):
        return first_argmax(logits_BV)

    def draw(_):
        scaled_BV = logits_BV / temperature
        # Sorting the vocabulary costs more than the rest of the rule; skip it when nothing filters.
        needs_filter = ((top_k > 0) & (top_k < logits_BV.shape[-1])) | (top_p < 1.0)
        scaled_BV = jax.lax.cond(needs_filter, lambda x: filter_top_k_top_p(x, top_k, top_p), lambda x: x, scaled_BV)
        gumbel_BV = jax.vmap(lambda k: jax.random.gumbel(k, logits_BV.shape[-1:], jnp.float32))(keys_B)
        return first_argmax(scaled_BV + gumbel_BV)

    return jax.lax.cond(temperature > 0, draw, greedy, None)


def token_logprobs(logits_BV, tokens_B):
    """log p(token) under the model's raw distribution (temperature 1, before penalty and filters)."""
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BV, tokens_B[:, None], axis=-1)[:, 0]


def row_keys(seed, prompt_hashes_B, sample_ids_B, step):
    """Per-row PRNG keys for one decode step: fold_in(seed, prompt hash, sample index, step), `step`
    being the row's own step (one for all rows, or one per row [B]).

    The prompt hash is computed from the prompt's content (not a data set's prompt id), so a row's
    randomness depends on what it is, not on where it sits: samples do not change with batch size,
    batch order or the other prompts.
    """
    base = jax.random.key(seed)

    def one(prompt_hash, sample, t):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, prompt_hash), sample), t)

    return jax.vmap(one)(prompt_hashes_B, sample_ids_B, jnp.broadcast_to(step, jnp.shape(prompt_hashes_B)))
