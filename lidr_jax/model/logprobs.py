"""Log-probs of answer tokens under the model: every scoring pass and the DPO train step.

`target_logprobs` gives log p(target) of chosen positions with the vocabulary head run only there and
in float32 chunks; `entry_logprobs` runs the model over segmented rows and gives every scored entry's
log-prob; `pair_logprobs` sums them per answer of the rows of lidr_jax.model.scoring.answer_batch (the
prompt run once for an answer and a second answer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lidr_jax.model.attention import Attention
from lidr_jax.model.llama import hidden_states, unembed


def target_logprobs(params, h_BTD, targets_BE, config, *, index_BE=None, chunk: int = 256):
    """log p(target) [B, E] in float32: entry e is predicted by the hidden state at position
    `index_BE[b, e]` (default: position e itself, so E = T).

    Logits exist only for the E entries asked for (the vocabulary head is the largest matmul of a
    small model). The log-softmax runs in float32 over chunks of `chunk` entries inside `lax.map`;
    with more than one chunk each is `jax.checkpoint`ed, so the backward pass recomputes a chunk's
    [B, chunk, V] logits instead of saving them and [B, E, V] float32 logits never exist at once (at
    V = 128k and E = 4k they would be 2 GB per row). chunk = 0 or >= E is one chunk, whose logits
    are kept for the backward pass (no recomputation).
    """
    h_BED = h_BTD if index_BE is None else jnp.take_along_axis(h_BTD, index_BE[..., None], axis=1)
    B, E, D = h_BED.shape

    def chunk_logp(args):
        h_BCD, tgt_BC = args
        logits = unembed(params, h_BCD, config)  # float32
        # log p = logit − logsumexp, faster on CPU than gathering from a full log_softmax (BENCHMARKS.md, DPO)
        return jnp.take_along_axis(logits, tgt_BC[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)

    if chunk <= 0 or chunk >= E:
        return chunk_logp((h_BED, targets_BE))
    n = -(-E // chunk)
    pad = n * chunk - E  # padded entries are dropped below

    def split(x):  # [B, E, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    per_chunk = jax.lax.map(jax.checkpoint(chunk_logp), (split(h_BED), split(targets_BE)))
    return jnp.moveaxis(per_chunk, 0, 1).reshape(B, n * chunk)[:, :E]


def entry_logprobs(params, batch, config, *, chunk: int = 256, remat: str = "none", attention: Attention | str = "xla"):
    """log p of every scored entry [B, E] of a batch of segmented rows (tokens, positions, segments,
    attention_mask [B, T]; targets, logit_index [B, E]): lidr_jax.model.scoring.answer_batch's and
    lidr_jax.train.packing's."""
    h_BTD, _ = hidden_states(
        params,
        batch["tokens"],
        config,
        positions_BT=batch["positions"],
        attention_mask_BT=batch["attention_mask"],
        segments_BT=batch["segments"],
        remat=remat,
        attention=attention,
    )
    return target_logprobs(params, h_BTD, batch["targets"], config, index_BE=batch["logit_index"], chunk=chunk)


def pair_logprobs(params, batch, config, *, chunk: int = 256, remat: str = "none", attention: Attention | str = "xla"):
    """Summed log-probs of each row's two answers (lidr_jax.model.scoring.answer_batch: one row per prompt,
    the prompt run once; a preference pair's chosen and rejected answers): (logp_chosen [B], logp_rejected
    [B], count_chosen [B]), float32. `attention`: a resolved lidr_jax.model.attention implementation."""
    tok = entry_logprobs(params, batch, config, chunk=chunk, remat=remat, attention=attention)
    chosen, rejected = batch["chosen_mask"].astype(bool), batch["rejected_mask"].astype(bool)
    logp_c, logp_r = (jnp.sum(jnp.where(m, tok, 0.0), axis=-1) for m in (chosen, rejected))
    return logp_c, logp_r, jnp.sum(chosen, axis=-1).astype(jnp.float32)
