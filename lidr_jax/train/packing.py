"""Several preference pairs per row: first-fit packing into rows of a fixed token budget (`dpo.row_tokens`).

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
`grad_accum` micro-batches. `plan_packing` fixes R, P and E over the whole run (the largest any step
needs), so every step has the same shape and the train step compiles once. Pairs longer than a row are
cut by lidr_jax.train.pairs.fit_pair when they are encoded (counted in `truncated_to_row`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from lidr_jax.model.logprobs import answer_logprobs
from lidr_jax.train.pairs import EncodedPairs


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """The fixed shape of every packed micro-batch of a run: rows [R, row_tokens], entries [R, E], slots [R, P]."""

    row_tokens: int
    share_prompt: bool
    rows: int  # R, rows per micro-batch
    slots: int  # P, most pairs in one row
    entries: int  # E, most answer tokens in one row


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


def plan_packing(
    enc: EncodedPairs, steps: Iterable[Sequence[int]], row_tokens: int, grad_accum: int, share_prompt: bool = True
) -> PackPlan:
    """The one shape that holds every step's packed micro-batches (`steps`: each step's pair indices)."""
    lengths, answers = pair_tokens(enc, share_prompt), enc.answer_lengths()
    rows = slots = entries = 1
    for idx in steps:
        for micro in step_rows(enc, idx, row_tokens, grad_accum, share_prompt):
            rows = max(rows, len(micro))
            for row in micro:
                slots = max(slots, len(row))
                entries = max(entries, int(answers[row].sum()))
                assert int(lengths[row].sum()) <= row_tokens
    return PackPlan(row_tokens, share_prompt, rows, slots, -(-entries // 16) * 16)


def packed_batch(
    enc: EncodedPairs, rows: Sequence[Sequence[int]], pad_id: int, plan: PackPlan
) -> dict[str, np.ndarray]:
    """One micro-batch of packed rows (module docstring). Keys [R, T]: tokens, positions, segments,
    attention_mask; [R, E]: logit_index, targets, chosen_mask, rejected_mask, entry_slot; [R, P]:
    weight (1 for a pair, 0 for an empty slot) and pair (its index in `enc`, -1 when empty)."""
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
            p, c, r = enc.prompt_ids[i], enc.chosen_ids[i], enc.rejected_ids[i]
            n_p, n_c, n_r = len(p), len(c), len(r)
            m = n_c + n_r
            if plan.share_prompt:
                n = n_p + n_c + n_r
                ids = [p, c, r]
                positions = [np.arange(n_p + n_c), n_p + np.arange(n_r)]
                segments = np.repeat([3 * j, 3 * j + 1, 3 * j + 2], [n_p, n_c, n_r])
                # As pair_batch, shifted to the pair's place: answer token k is predicted at its previous
                # token; the first token of either answer at the prompt's last.
                index = [n_p - 1 + np.arange(n_c), [n_p - 1], n_p + n_c + np.arange(n_r - 1)]
            else:
                n = 2 * n_p + n_c + n_r
                ids = [p, c, p, r]
                positions = [np.arange(n_p + n_c), np.arange(n_p + n_r)]
                g = 2 * j  # groups g (prompt, chosen) and g + 1 (prompt, rejected)
                segments = np.repeat([3 * g, 3 * g + 1, 3 * g + 3, 3 * g + 5], [n_p, n_c, n_p, n_r])
                index = [n_p - 1 + np.arange(n_c), 2 * n_p + n_c - 1 + np.arange(n_r)]
            if t + n > T or e + m > E or j >= P:
                raise ValueError(f"row {b} does not fit the plan {plan}")
            out["tokens"][b, t : t + n] = np.concatenate(ids)
            out["positions"][b, t : t + n] = np.concatenate(positions)
            out["segments"][b, t : t + n] = segments
            out["attention_mask"][b, t : t + n] = True
            out["logit_index"][b, e : e + m] = t + np.concatenate(index)
            out["targets"][b, e : e + m] = np.concatenate([c, r])
            out["chosen_mask"][b, e : e + n_c] = True
            out["rejected_mask"][b, e + n_c : e + m] = True
            out["entry_slot"][b, e : e + m] = j
            out["weight"][b, j], out["pair"][b, j] = 1.0, i
            t, e = t + n, e + m
    return out


def packed_step_batch(enc: EncodedPairs, ref, idx: Sequence[int], grad_accum: int, pad_id: int, plan: PackPlan):
    """Stacked packed micro-batches [A, R, ...] for one optimizer step, with the reference log-probs of
    each slot (`ref_chosen`, `ref_rejected` [A, R, P]; 0 for empty slots)."""
    micro = []
    for rows in step_rows(enc, idx, plan.row_tokens, grad_accum, plan.share_prompt):
        mb = packed_batch(enc, rows, pad_id, plan)
        pair = mb.pop("pair")
        safe = np.maximum(pair, 0)
        for key, side in (("ref_chosen", "chosen"), ("ref_rejected", "rejected")):
            mb[key] = np.where(pair >= 0, np.asarray(ref[side])[safe], 0.0).astype(np.float32)
        micro.append(mb)
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def packed_logprobs(params, batch, config, *, chunk: int = 256, remat: str = "none", attention: str = "xla"):
    """Per-pair summed answer log-probs of packed rows: (logp_chosen, logp_rejected, count_chosen,
    count_rejected), each [R * P] float32 (slot j of row b at b * P + j). `attention`: a resolved
    lidr_jax.model.attention implementation (splash only for rows packed without share_prompt)."""
    tok_BE = answer_logprobs(params, batch, config, chunk=chunk, remat=remat, attention=attention)
    in_slot_BEP = batch["entry_slot"][..., None] == jnp.arange(batch["weight"].shape[-1])

    def per_pair(mask_BE, values_BE):
        sel = mask_BE.astype(bool)[..., None] & in_slot_BEP
        return jnp.sum(jnp.where(sel, values_BE[..., None], 0.0), axis=1).reshape(-1)

    ones = jnp.ones_like(tok_BE)
    chosen, rejected = batch["chosen_mask"], batch["rejected_mask"]
    return per_pair(chosen, tok_BE), per_pair(rejected, tok_BE), per_pair(chosen, ones), per_pair(rejected, ones)
