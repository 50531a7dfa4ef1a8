"""Several preference pairs per row: first-fit packing into rows of a token budget (`dpo.row_tokens`).

A packed row holds whole pairs one after another, each laid out as in lidr_jax.train.pairs.pair_batch
(`prompt | chosen | rejected`, the prompt run once for both answers), then padding:
- segments: the pair in slot j of its row has 3j (prompt), 3j + 1 (chosen), 3j + 2 (rejected), so a
  token attends only within its own pair (lidr_jax.model.llama.hidden_states);
- positions restart at 0 for every pair (its rejected answer continuing from its prompt's end), so a
  pair's log-probs are those of its own row;
- entries [R, E]: one per answer token of every pair in the row, `entry_slot` naming its pair's slot.
With `share_prompt=False` a pair is written `prompt | chosen | prompt | rejected` instead, two groups
(2j: prompt and chosen, 2j + 1: prompt and rejected), so no group holds two answers and attention is
plain causal attention within a group: what splash attention's segment ids express
(lidr_jax.model.attention); the prompt is then run twice.
Per-pair quantities (`weight`, reference log-probs, the log-probs) are [R, P] (P slots per row, empty
slots weight 0) and are flattened to [R * P] for the loss, so loss and metrics are per pair as with one
row per pair.

A step's pairs (the same pairs as without packing: `batch_size * grad_accum`) are packed first-fit
decreasing (longest first, each into the first row with room) and the rows dealt round-robin to the
`grad_accum` micro-batches. The shape of the micro-batches (`PackPlan`: R rows of T tokens, E entries,
P slots, M block pairs) is either the run's (`plan_packing`: the largest any step needs, so the train
step compiles once) or each step's own (`step_plan`, `dpo.pack_shapes: step`: T the step's longest row
rounded up to `bucket_multiple` (512 by default), so a step of short pairs is not padded to the run's
longest; one compilation per distinct shape). Pairs longer than a row are cut by
lidr_jax.train.pairs.fit_pair when they are encoded (counted in `truncated_to_row`).

Attention over packed rows (`block_attention`, used by `packed_logprobs` with xla attention): a row of
T tokens is cut into blocks of `block` tokens and only the (query block, key block) pairs in which some
query sees some key are computed (`block_pairs`, listed per row on the host): a pair never attends to
another, so the work grows with the sum of each pair's squared length rather than the row's, and a long
row of many short pairs costs what the pairs cost. The softmax is exact (the maximum and the sum over all
of a query's key blocks, scattered per query block), so it equals dense attention to float32 rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lidr_jax.model.attention import Attention
from lidr_jax.model.logprobs import entry_logprobs
from lidr_jax.model.segments import MASKED, prefix_segment, segment_sees
from lidr_jax.shapes import bucket
from lidr_jax.train.pairs import EncodedPairs

BLOCK = 128  # tokens per attention block (query and key) of `block_attention`


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """The shape of packed micro-batches: rows [R, row_tokens], entries [R, E], slots [R, P], block pairs
    [R, M] of `block`-token blocks (0: no block tables, dense attention)."""

    row_tokens: int
    share_prompt: bool
    rows: int  # R, rows per micro-batch
    slots: int  # P, most pairs in one row
    entries: int  # E, most answer tokens in one row
    block: int = 0  # tokens per attention block; 0: no block tables
    blocks: int = 0  # M, most (query block, key block) pairs in one row
    budget: int = 0  # tokens a row is packed to (first_fit); 0: row_tokens (a step's own shape may be shorter)

    @property
    def pack_tokens(self) -> int:
        return self.budget or self.row_tokens


def first_fit(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Positions in `lengths` grouped into rows of at most `row_tokens`: first-fit decreasing."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-np.asarray(lengths, np.int64), kind="stable"):
        n = int(lengths[i])
        if n > row_tokens:
            raise ValueError(f"a pair of {n} tokens does not fit a row of {row_tokens} (encode with row_tokens)")
        for k, free in enumerate(room):
            if n <= free:
                rows[k].append(int(i))
                room[k] -= n
                break
        else:
            rows.append([int(i)])
            room.append(row_tokens - n)
    return rows


def pair_tokens(enc: EncodedPairs, share_prompt: bool = True) -> np.ndarray:
    """Tokens each pair takes in a packed row: prompt + chosen + rejected, plus the prompt again without
    `share_prompt`."""
    return enc.lengths() + (0 if share_prompt else np.array([len(p) for p in enc.prompt_ids], np.int64))


def step_rows(
    enc: EncodedPairs, idx: Sequence[int], row_tokens: int, grad_accum: int, share_prompt: bool = True
) -> list[list[list[int]]]:
    """The pairs `idx` of one optimizer step as rows of pair indices, dealt to `grad_accum` micro-batches."""
    idx = np.asarray(idx)
    rows = [[int(idx[j]) for j in row] for row in first_fit(pair_tokens(enc, share_prompt)[idx], row_tokens)]
    return [rows[a::grad_accum] for a in range(grad_accum)]


def attention_block(row_tokens: int) -> int:
    """The block of `block_attention` for rows of `row_tokens`: BLOCK, or the largest power of two
    dividing a shorter or odd length (so blocks tile the row)."""
    block = BLOCK
    while row_tokens % block:
        block //= 2
    return block


def block_pairs(segments_T: np.ndarray, mask_T: np.ndarray, block: int) -> np.ndarray:
    """[M, 2] (query block, key block) of one packed row in which some real query sees some real key
    (lidr_jax.model.llama.hidden_states's rule: same group, key not later, key in the group's prefix or
    the query's own segment), sorted by query block. Segments must be contiguous runs (as `packed_batch`
    writes them)."""
    T = len(segments_T)
    nb = T // block
    t = np.flatnonzero(mask_T)
    seg = segments_T[t].astype(np.int64)
    first, last = np.full(seg.max(initial=0) + 1, T), np.full(seg.max(initial=0) + 1, -1)
    np.minimum.at(first, seg, t)  # each segment's first and last token
    np.maximum.at(last, seg, t)
    prefix = prefix_segment(seg)
    has_prefix = (seg != prefix) & (first[prefix] < T)
    # a query sees [start of its segment, itself] and, outside the prefix, its group's prefix
    a = np.concatenate([first[seg], first[prefix][has_prefix]])
    b = np.concatenate([t, last[prefix][has_prefix]])
    q = np.concatenate([t, t[has_prefix]]) // block
    marks = np.zeros((nb, nb + 1), np.int64)  # +1 at a key range's first block, -1 after its last
    np.add.at(marks, (q, a // block), 1)
    np.add.at(marks, (q, b // block + 1), -1)
    q, k = np.nonzero(np.cumsum(marks, axis=1)[:, :nb] > 0)
    return np.stack([q, k], axis=1).astype(np.int32)


def _layout(enc: EncodedPairs, i: int, j: int, share_prompt: bool):
    """Pair i in slot j of a row: its ids, positions, segments and the answer entries' logit index, all
    relative to the pair's first token."""
    p, c, r = enc.prompt_ids[i], enc.chosen_ids[i], enc.rejected_ids[i]
    n_p, n_c, n_r = len(p), len(c), len(r)
    if share_prompt:
        ids = [p, c, r]
        positions = [np.arange(n_p + n_c), n_p + np.arange(n_r)]
        segments = np.repeat([3 * j, 3 * j + 1, 3 * j + 2], [n_p, n_c, n_r])
        # As pair_batch, shifted to the pair's place: answer token k is predicted at its previous
        # token; the first token of either answer at the prompt's last.
        index = [n_p - 1 + np.arange(n_c), [n_p - 1], n_p + n_c + np.arange(n_r - 1)]
    else:
        ids = [p, c, p, r]
        positions = [np.arange(n_p + n_c), np.arange(n_p + n_r)]
        g = 2 * j  # groups g (prompt, chosen) and g + 1 (prompt, rejected)
        segments = np.repeat([3 * g, 3 * g + 1, 3 * g + 3, 3 * g + 5], [n_p, n_c, n_p, n_r])
        index = [n_p - 1 + np.arange(n_c), 2 * n_p + n_c - 1 + np.arange(n_r)]
    return np.concatenate(ids), np.concatenate(positions), segments, np.concatenate(index), c, r


def _row_segments(enc: EncodedPairs, row: Sequence[int], T: int, share_prompt: bool):
    segments, mask = np.zeros(T, np.int32), np.zeros(T, bool)
    t = 0
    for j, i in enumerate(row):
        seg = _layout(enc, i, j, share_prompt)[2]
        segments[t : t + len(seg)], mask[t : t + len(seg)] = seg, True
        t += len(seg)
    return segments, mask


def _shape(enc: EncodedPairs, micros, row_tokens: int, share_prompt: bool, block: int) -> tuple[int, int, int, int]:
    """(rows, slots, entries, block pairs) that hold every micro-batch of `micros` (rows of pair indices)."""
    lengths, answers = pair_tokens(enc, share_prompt), enc.answer_lengths()
    rows = slots = entries = blocks = 1
    for micro in micros:
        rows = max(rows, len(micro))
        for row in micro:
            slots = max(slots, len(row))
            entries = max(entries, int(answers[row].sum()))
            assert int(lengths[row].sum()) <= row_tokens
            if block:
                blocks = max(blocks, len(block_pairs(*_row_segments(enc, row, row_tokens, share_prompt), block)))
    return rows, slots, entries, blocks


def plan_packing(
    enc: EncodedPairs,
    steps: Iterable[Sequence[int]],
    row_tokens: int,
    grad_accum: int,
    share_prompt: bool = True,
    block_tables: bool = True,
) -> PackPlan:
    """The one shape that holds every step's packed micro-batches (`steps`: each step's pair indices).
    `block_tables`: list the block pairs of `block_attention` (xla attention)."""
    block = attention_block(row_tokens) if block_tables else 0
    micros = (m for idx in steps for m in step_rows(enc, idx, row_tokens, grad_accum, share_prompt))
    rows, slots, entries, blocks = _shape(enc, micros, row_tokens, share_prompt, block)
    return PackPlan(row_tokens, share_prompt, rows, slots, -(-entries // 16) * 16, block, blocks if block else 0)


def step_plan(
    enc: EncodedPairs,
    idx: Sequence[int],
    row_tokens: int,
    grad_accum: int,
    share_prompt: bool = True,
    block_tables: bool = True,
    multiple: int = 0,
) -> PackPlan:
    """The shape of one step's packed micro-batches alone (`dpo.pack_shapes: step`): rows as long as the
    step's longest, rounded up to `multiple` (0: 512; never past `row_tokens` rounded up to BLOCK), entries
    to 512, slots to a power of two, block pairs to a multiple of twice the row's blocks: few distinct
    shapes, so few compilations."""
    micros = step_rows(enc, idx, row_tokens, grad_accum, share_prompt)
    lengths = pair_tokens(enc, share_prompt)
    longest = max(int(lengths[row].sum()) for micro in micros for row in micro)
    cap = -(-row_tokens // BLOCK) * BLOCK
    T = min(bucket(longest, minimum=16, knee=0, step=multiple or 512), cap)
    T = -(-T // BLOCK) * BLOCK if T >= BLOCK else T
    block = attention_block(T) if block_tables else 0
    rows, slots, entries, blocks = _shape(enc, micros, T, share_prompt, block)
    nb = T // block if block else 1
    return PackPlan(
        T,
        share_prompt,
        rows,
        1 << (slots - 1).bit_length(),
        bucket(entries, minimum=16, knee=0, step=512),
        block,
        -(-blocks // (2 * nb)) * 2 * nb if block else 0,
        row_tokens,
    )


def packed_batch(
    enc: EncodedPairs, rows: Sequence[Sequence[int]], pad_id: int, plan: PackPlan
) -> dict[str, np.ndarray]:
    """One micro-batch of packed rows (module docstring). Keys [R, T]: tokens, positions, segments,
    attention_mask; [R, E]: logit_index, targets, chosen_mask, rejected_mask, entry_slot; [R, P]:
    weight (1 for a pair, 0 for an empty slot) and pair (its index in `enc`, -1 when empty); with block
    tables, [R, M]: block_q, block_k (the block pairs of `block_attention`), block_valid."""
    R, T, E, P = plan.rows, plan.row_tokens, plan.entries, plan.slots
    if len(rows) > R:
        raise ValueError(f"{len(rows)} rows do not fit a micro-batch of {R}")
    out = {k: np.full((R, T), pad_id if k == "tokens" else 0, np.int32) for k in ("tokens", "positions", "segments")}
    out |= {
        k: np.full((R, E), pad_id if k == "targets" else 0, np.int32) for k in ("logit_index", "targets", "entry_slot")
    }
    out |= {k: np.zeros((R, E), bool) for k in ("chosen_mask", "rejected_mask")}
    out |= {"attention_mask": np.zeros((R, T), bool), "weight": np.zeros((R, P), np.float32)}
    out["pair"] = np.full((R, P), -1, np.int64)
    for b, row in enumerate(rows):
        t = e = 0
        for j, i in enumerate(row):
            ids, positions, segments, index, c, r = _layout(enc, i, j, plan.share_prompt)
            n, m = len(ids), len(c) + len(r)
            if t + n > T or e + m > E or j >= P:
                raise ValueError(f"row {b} does not fit the plan {plan}")
            out["tokens"][b, t : t + n] = ids
            out["positions"][b, t : t + n] = positions
            out["segments"][b, t : t + n] = segments
            out["attention_mask"][b, t : t + n] = True
            out["logit_index"][b, e : e + m] = t + index
            out["targets"][b, e : e + m] = np.concatenate([c, r])
            out["chosen_mask"][b, e : e + len(c)] = True
            out["rejected_mask"][b, e + len(c) : e + m] = True
            out["entry_slot"][b, e : e + m] = j
            out["weight"][b, j], out["pair"][b, j] = 1.0, i
            t, e = t + n, e + m
    if plan.block:
        M = plan.blocks
        out |= {k: np.zeros((R, M), np.int32) for k in ("block_q", "block_k")}
        out["block_valid"] = np.zeros((R, M), bool)
        for b in range(R):
            qk = block_pairs(out["segments"][b], out["attention_mask"][b], plan.block)
            if len(qk) > M:
                raise ValueError(f"row {b} needs {len(qk)} block pairs, more than the plan's {M}")
            out["block_q"][b, : len(qk)], out["block_k"][b, : len(qk)] = qk[:, 0], qk[:, 1]
            # padding entries repeat the last query block (sorted ids for the segment sums), keys masked
            out["block_q"][b, len(qk) :] = qk[-1, 0] if len(qk) else 0
            out["block_valid"][b, : len(qk)] = True
    return out


def packed_step_batch(enc: EncodedPairs, ref, idx: Sequence[int], grad_accum: int, pad_id: int, plan: PackPlan):
    """Stacked packed micro-batches [A, R, ...] for one optimizer step, with the reference log-probs of
    each slot (`ref_chosen`, `ref_rejected` [A, R, P]; 0 for empty slots; `ref` None: no reference keys)."""
    micro = []
    for rows in step_rows(enc, idx, plan.pack_tokens, grad_accum, plan.share_prompt):
        mb = packed_batch(enc, rows, pad_id, plan)
        pair = mb.pop("pair")
        safe = np.maximum(pair, 0)
        if ref is None:
            mb["pair"] = pair
        else:
            for key, side in (("ref_chosen", "chosen"), ("ref_rejected", "rejected")):
                mb[key] = np.where(pair >= 0, np.asarray(ref[side])[safe], 0.0).astype(np.float32)
        micro.append(mb)
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def block_seen(batch, T: int, block: int):
    """Which keys each query sees in each block pair of `batch` (block_q, block_k, block_valid [B, M],
    segments, attention_mask [B, T]): bool [B, M, Cq, Ck] (`block_pairs`'s rule). Made once per pass,
    outside the layer scan (`packed_logprobs`), so no layer rebuilds it and no remat policy recomputes it."""
    B, C, nb = batch["segments"].shape[0], block, T // block
    bq, bk = batch["block_q"], batch["block_k"]

    def tiles(x_BT):  # [B, T] -> [B, nb, C]
        return x_BT.reshape(B, nb, C)

    def pick(x_BnC, idx_BM):  # the blocks idx of each row: [B, M, C]
        return jax.vmap(lambda x, i: x[i])(x_BnC, idx_BM)

    tok, seg = tiles(jnp.broadcast_to(jnp.arange(T), (B, T))), tiles(batch["segments"])
    tq, tk = pick(tok, bq)[..., :, None], pick(tok, bk)[..., None, :]
    sq, sk = pick(seg, bq)[..., :, None], pick(seg, bk)[..., None, :]
    seen = pick(tiles(batch["attention_mask"].astype(bool)), bk)[..., None, :] & (tk <= tq) & segment_sees(sq, sk)
    return seen & batch["block_valid"][..., None, None]


def block_attention(q_BTNH, k_BKTH, v_BKTH, batch, block: int, seen=None):
    """Grouped-query attention over packed rows, computed only on the block pairs listed in `batch`
    (block_q, block_k, block_valid [B, M]; module docstring); which keys a query sees inside a block pair
    follows the row's segments, positions of tokens and attention mask (`block_pairs`'s rule; `seen`:
    `block_seen` of the batch, made here when not given). Scores and softmax in float32; output
    [B, T, N, H]. A query that sees nothing (padding) gets zeros."""
    with jax.named_scope("block_attention"):  # its ops named so in profiles (scripts/bench_dpo.py --profile)
        return _block_attention(q_BTNH, k_BKTH, v_BKTH, batch, block, seen)


def _block_attention(q_BTNH, k_BKTH, v_BKTH, batch, block: int, seen):
    B, T, N, H = q_BTNH.shape
    K = k_BKTH.shape[1]
    G, C, nb = N // K, block, T // block
    bq, bk = batch["block_q"], batch["block_k"]
    seen = block_seen(batch, T, block) if seen is None else seen

    def pick(x_BnC, idx_BM):  # the blocks idx of each row: [B, M, ...]
        return jax.vmap(lambda x, i: x[i])(x_BnC, idx_BM)

    # Gathered q, k, v are M / nb times larger than q, k, v: the backward pass gathers them again
    # instead of keeping them (jax.checkpoint around the gather alone).
    gather = jax.checkpoint(pick)

    def tiles(x_BT):  # [B, T, ...] -> [B, nb, C, ...]
        return x_BT.reshape(B, nb, C, *x_BT.shape[2:])

    scale = jnp.asarray(H**-0.5, q_BTNH.dtype)
    q = gather(tiles(q_BTNH * scale).reshape(B, nb, C, K, G, H), bq)  # [B, M, C, K, G, H]
    k = gather(tiles(k_BKTH.transpose(0, 2, 1, 3)), bk)  # [B, M, C, K, H]
    v = gather(tiles(v_BKTH.transpose(0, 2, 1, 3)), bk)
    s = jnp.einsum("BMcKGH,BMdKH->BMKGcd", q, k, preferred_element_type=jnp.float32)
    seen = seen[:, :, None, None]

    def per_query_block(op, x_BM):  # reduce [B, M, ...] over the block pairs of each query block
        return jax.vmap(lambda x, i: op(x, i, num_segments=nb, indices_are_sorted=True))(x_BM, bq)

    # Each query's maximum over all its key blocks (a constant for the gradient; finite: MASKED where
    # a query sees nothing), then p = exp(s − max), 0 where unseen: one [B, M, K, G, C, C] array is kept
    # for the backward pass (exp's output, which the output einsum also needs).
    masked = jnp.where(seen, jax.lax.stop_gradient(s), MASKED)
    m = jax.lax.stop_gradient(per_query_block(jax.ops.segment_max, jnp.max(masked, axis=-1)))  # [B, nb, K, G, C]
    p = jnp.exp(jnp.where(seen, s - pick(m, bq)[..., None], -jnp.inf))
    total = per_query_block(jax.ops.segment_sum, jnp.sum(p, axis=-1))  # [B, nb, K, G, C]
    o = jnp.einsum("BMKGcd,BMdKH->BMKGcH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    # the sum over key blocks is named for remat (lidr_jax.model.llama.REMAT_POLICIES["names"] keeps it, so the
    # backward pass of the division needs no recomputed output einsum)
    o = checkpoint_name(per_query_block(jax.ops.segment_sum, o), "attn_out")  # [B, nb, K, G, C, H]
    o = o / jnp.maximum(total, 1e-30)[..., None]
    return o.transpose(0, 1, 4, 2, 3, 5).reshape(B, T, N, H).astype(q_BTNH.dtype)


def packed_logprobs(
    params, batch, config, *, chunk: int = 256, remat: str = "none", attention: Attention | str = "xla"
):
    """Per-pair summed answer log-probs of packed rows: (logp_chosen, logp_rejected, count_chosen,
    count_rejected), each [R * P] float32 (slot j of row b at b * P + j). `attention`: a resolved
    lidr_jax.model.attention implementation (splash only for rows packed without share_prompt); xla over
    a batch with block tables runs `block_attention`."""
    if (
        Attention.of(attention).masked_einsums and "block_q" in batch
    ):  # packed rows' own attention (blocks as the plan's)
        block = attention_block(batch["tokens"].shape[1])

        seen = block_seen(batch, batch["tokens"].shape[1], block)  # once, outside the layer scan

        def blocks(q, k, v):
            return block_attention(q, k, v, batch, block, seen)

        attention = Attention("blocks", own=blocks)

    tok_BE = entry_logprobs(params, batch, config, chunk=chunk, remat=remat, attention=attention)
    in_slot_BEP = batch["entry_slot"][..., None] == jnp.arange(batch["weight"].shape[-1])

    def per_pair(mask_BE, values_BE):
        sel = mask_BE.astype(bool)[..., None] & in_slot_BEP
        return jnp.sum(jnp.where(sel, values_BE[..., None], 0.0), axis=1).reshape(-1)

    ones = jnp.ones_like(tok_BE)
    chosen, rejected = batch["chosen_mask"], batch["rejected_mask"]
    return per_pair(chosen, tok_BE), per_pair(rejected, tok_BE), per_pair(chosen, ones), per_pair(rejected, ones)
