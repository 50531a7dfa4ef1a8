"""Several pairs per row (lidr_jax.train.packing): packed rows equal one row per pair (log-probs, losses,
metrics, gradients within 1e-5 in float32: absolute, and relative for summed log-probs of ~50 where one
float32 step is 4e-6), a pair never attends to another, the truncation rule, one
compilation per run and the padding share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lidr_jax.train.trainer as trainer_module
from lidr_jax.model.logprobs import pair_logprobs
from lidr_jax.model.scoring import ScoringConfig
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.packing import (
    block_pairs,
    first_fit,
    packed_batch,
    packed_logprobs,
    packed_step_batch,
    plan_packing,
    step_rows,
)
from lidr_jax.train.pairs import EncodedPairs, fit_pair, pair_batch
from lidr_jax.train.trainer import accumulated_grads, pack_plan, step_batch, train
from tests.dpo_helpers import numpy_init, tiny_config

LENGTHS = [(5, 7, 3), (9, 2, 11), (3, 4, 4), (12, 6, 8), (4, 10, 1), (7, 3, 5), (2, 8, 6), (6, 5, 9)]


def _pairs(lengths=LENGTHS, seed=0, vocab=128) -> EncodedPairs:
    rng = np.random.default_rng(seed)
    draw = [[rng.integers(4, vocab, n).astype(np.int32) for n in sizes] for sizes in lengths]
    return EncodedPairs(*(list(x) for x in zip(*draw, strict=True)))


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    # Weights 3x the usual scale, so attention and positions change the log-probs visibly (at 10x the
    # gradients amplify float32 rounding: a different padding length alone moves them by 1e-4).
    params = jax.tree.map(lambda a: a * 3.0 if a.ndim > 1 else a, numpy_init(config, seed=1))
    return config, params


def _separate(config, params, enc, idx):
    b = pair_batch(enc, idx, pad_id=0)
    return pair_logprobs(params, {k: v for k, v in b.items() if k != "weight"}, config, chunk=0)


def test_first_fit_decreasing_rows():
    assert first_fit([5, 9, 3, 7], 12) == [[1, 2], [3, 0]]
    assert first_fit([12, 1], 12) == [[0], [1]]
    with pytest.raises(ValueError, match="a pair of 13 tokens does not fit a row of 12"):
        first_fit([13], 12)


def test_fit_pair_rule():
    p, c, r = (np.arange(n) for n in (10, 8, 30))
    # the prompt (10 <= 16) is kept; the answers share 22: the shorter keeps its 8, the longer 14
    fp, fc, fr, cut = fit_pair(p, c, r, 32)
    assert (list(fp), list(fc), list(fr), cut) == (list(p), list(c), list(r[:14]), True)
    fp, fc, fr, cut = fit_pair(np.arange(40), c, r, 32)
    assert (list(fp), len(fc), len(fr), cut) == (list(range(24, 40)), 8, 8, True)
    fp, fc, fr, cut = fit_pair(p, np.arange(3), np.arange(4), 32)
    assert (len(fp), len(fc), len(fr), cut) == (10, 3, 4, False)


def test_packed_rows_equal_separate_rows_logprobs(model):
    config, params = model
    enc = _pairs()
    idx = list(range(len(enc)))
    rows = [list(r) for r in first_fit(enc.lengths(), 48)]
    assert max(len(r) for r in rows) >= 3, rows  # several pairs per row
    plan = plan_packing(enc, [idx], 48, 1)
    batch = packed_batch(enc, rows, 0, plan)
    pair = batch.pop("pair").reshape(-1)
    c, r, nc, nr = (np.asarray(x) for x in packed_logprobs(params, batch, config, chunk=0))
    ref_c, ref_r, ref_nc = (np.asarray(x) for x in _separate(config, params, enc, idx))
    real = pair >= 0
    order = pair[real]
    np.testing.assert_allclose(c[real], ref_c[order], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(r[real], ref_r[order], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(nc[real], ref_nc[order])
    np.testing.assert_array_equal(nr[real], enc.answer_lengths()[order] - ref_nc[order])
    assert np.all(c[~real] == 0) and np.all(nc[~real] == 0)


def test_a_pair_never_attends_to_another(model):
    """Mutation check: changing every token of one pair of a packed row changes that pair's log-probs
    and leaves every other pair of the row exactly as it was."""
    config, params = model
    enc = _pairs()
    plan = plan_packing(enc, [[0, 1, 2, 3]], 200, 1)
    (rows,) = step_rows(enc, [0, 1, 2, 3], 200, 1)  # the plan's order (its block tables follow the layout)
    assert plan.slots == 4
    base = packed_batch(enc, rows, 0, plan)
    base.pop("pair")
    before = np.asarray(packed_logprobs(params, base, config, chunk=0)[0])
    for victim in range(4):
        mutated = EncodedPairs(
            *[
                [(a + 17) % 120 + 4 if i == victim else a for i, a in enumerate(ids)]
                for ids in (enc.prompt_ids, enc.chosen_ids, enc.rejected_ids)
            ]
        )
        batch = packed_batch(mutated, rows, 0, plan)
        batch.pop("pair")
        after = np.asarray(packed_logprobs(params, batch, config, chunk=0)[0])
        slot = rows[0].index(victim)
        others = [j for j in range(4) if j != slot]
        np.testing.assert_array_equal(after[others], before[others])
        assert abs(after[slot] - before[slot]) > 1e-2


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_step_equals_one_row_per_pair(model, loss_type):
    """Gradients, loss and every metric of one optimizer step (2 micro-batches) with packed rows equal
    those with one row per pair, within 1e-5 (float32)."""
    config, params = model
    enc = _pairs()
    rng = np.random.default_rng(3)
    ref = {"chosen": rng.normal(-40, 5, len(enc)).astype(np.float32)}
    ref["rejected"] = rng.normal(-40, 5, len(enc)).astype(np.float32)
    base = DPOConfig(
        batch_size=4, grad_accum=2, compute=ScoringConfig(logprob_chunk=0), loss_type=loss_type, nll_weight=0.5
    )
    packed = base.replace(row_tokens=40)
    idx = np.arange(len(enc))
    grads, metrics = accumulated_grads(params, step_batch(enc, ref, idx, base, 0), config, base)
    pbatch = step_batch(enc, ref, idx, packed, 0)
    assert pbatch["tokens"].shape[1:] == (pack_plan(enc, packed).rows, 40)
    assert pbatch["weight"].sum() == len(enc) and pbatch["tokens"].shape[1] < 4  # fewer rows than pairs
    pgrads, pmetrics = accumulated_grads(params, pbatch, config, packed)
    for name in metrics:
        np.testing.assert_allclose(pmetrics[name], metrics[name], atol=1e-5, rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(pgrads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 1e-3  # gradients are not all ~0
    # on a mesh splitting rows 4 ways, empty rows (weight 0) pad each micro-batch to 4: the same step
    split = step_batch(enc, ref, idx, packed, 0, split=4)
    assert split["tokens"].shape[1] == 4 and split["weight"].sum() == len(enc)
    sgrads, smetrics = accumulated_grads(params, split, config, packed)
    for name in metrics:
        np.testing.assert_allclose(smetrics[name], pmetrics[name], atol=1e-5, rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(sgrads), jax.tree.leaves(pgrads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_packed_step_batch_reference_slots():
    enc = _pairs()
    ref = {"chosen": np.arange(8, dtype=np.float32), "rejected": -np.arange(8, dtype=np.float32)}
    plan = plan_packing(enc, [range(8)], 40, 2)
    batch = packed_step_batch(enc, ref, np.arange(8), 2, 0, plan)
    assert batch["weight"].shape == (2, plan.rows, plan.slots)
    got = sorted(batch["ref_chosen"][batch["weight"] > 0].tolist())
    assert got == list(range(8))
    assert np.all(batch["ref_rejected"][batch["weight"] > 0] <= 0)
    assert np.all(batch["ref_chosen"][batch["weight"] == 0] == 0)


def test_train_packed_compiles_once_and_reports_padding(model, monkeypatch):
    config, params = model
    lengths = [(int(a), int(b), int(c)) for a, b, c in np.random.default_rng(5).integers(2, 14, (24, 3))]
    enc = _pairs(lengths, seed=2)
    ref = {"chosen": np.full(len(enc), -50.0, np.float32), "rejected": np.full(len(enc), -50.0, np.float32)}
    cfg = DPOConfig(batch_size=4, grad_accum=2, epochs=2, row_tokens=48, learning_rate=1e-3, warmup=0)
    logged, compiled = [], []
    real_make = trainer_module.make_train_step

    def spy(*a, **k):
        compiled.append(real_make(*a, **k))
        return compiled[-1]

    monkeypatch.setattr(trainer_module, "make_train_step", spy)
    train(params, config, enc, ref, cfg, callback=lambda s, m: logged.append(m), progress=False)
    assert len(logged) == 6 and compiled[0]._cache_size() == 1
    ends = [m for m in logged if "epoch_padding_share" in m]
    assert [m["step"] for m in ends] == [3, 6]
    for m in ends:
        epoch = [x for x in logged if x["epoch"] == m["epoch"]]
        slots = sum(x["tokens"] / (1 - x["padding_share"]) for x in epoch)
        assert m["epoch_padding_share"] == pytest.approx(1 - sum(x["tokens"] for x in epoch) / slots)
        assert 0 <= m["epoch_padding_share"] < 1


def test_encode_pairs_cuts_pairs_to_the_row_and_counts_them():
    from lidr_jax.train.pairs import PreferencePair, encode_pairs
    from tests.dpo_helpers import tiny_tokenizer

    pairs = [PreferencePair("hi", "a" * 5, "b" * 6), PreferencePair("q" * 30, "c" * 40, "d" * 50)]
    plain = encode_pairs(pairs, tiny_tokenizer(), 1000, 1000)
    enc = encode_pairs(pairs, tiny_tokenizer(), 1000, 1000, row_tokens=64)
    assert enc.truncated_to_row == 1 and plain.truncated_to_row == 0
    assert enc.lengths()[1] == 64 and enc.lengths()[0] == plain.lengths()[0] <= 64
    assert list(enc.prompt_ids[1]) == list(plain.prompt_ids[1][-32:])  # the prompt keeps its end
    assert list(enc.chosen_ids[1]) == list(plain.chosen_ids[1][: len(enc.chosen_ids[1])])  # answers their start
    assert "1 pairs to fit a row" in enc.summary()


def test_block_pairs_are_the_blocks_the_dense_rule_allows():
    """block_pairs lists exactly the (query block, key block) pairs in which the dense mask of
    lidr_jax.model.llama (same group, causal, prefix or own segment, real tokens) allows something."""
    rng = np.random.default_rng(0)
    for share in (True, False):
        for block in (4, 8, 16):
            enc = _pairs([tuple(int(x) for x in rng.integers(1, 7, 3)) for _ in range(6)], seed=block)
            plan = plan_packing(enc, [range(6)], 128, 1, share_prompt=share)
            (rows,) = step_rows(enc, range(6), 128, 1, share)
            b = packed_batch(enc, rows, 0, plan)
            seg, mask = b["segments"][0], b["attention_mask"][0]
            si, sj = seg[:, None], seg[None, :]
            dense = mask[:, None] & mask[None, :] & np.tril(np.ones((128, 128), bool))
            dense &= (si // 3 == sj // 3) & ((sj % 3 == 0) | (sj == si))
            want = np.argwhere(dense.reshape(128 // block, block, 128 // block, block).any(axis=(1, 3)))
            np.testing.assert_array_equal(block_pairs(seg, mask, block), want)


def test_reference_pass_packed_equals_one_row_per_pair(model):
    config, params = model
    enc = _pairs()
    three = ScoringConfig(batch_size=3)
    plain = trainer_module.reference_logprobs(params, config, enc, DPOConfig(compute=three), progress=False)
    cfg = DPOConfig(compute=three, row_tokens=40)
    packed = trainer_module.reference_logprobs(params, config, enc, cfg, progress=False)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(packed[side], plain[side], atol=1e-5, rtol=1e-5)


def test_step_shapes_equal_run_shapes_and_pad_less(model):
    """pack_shapes: step gives each step its own (bucketed) rows: same gradients and metrics as the run's
    one shape within 1e-5, fewer padded tokens for a step of short pairs."""
    config, params = model
    lengths = [(20, 30, 25), (18, 28, 30)] + LENGTHS[:6]
    enc = _pairs(lengths)
    ref = {"chosen": np.full(len(enc), -40.0, np.float32), "rejected": np.full(len(enc), -45.0, np.float32)}
    run = DPOConfig(
        batch_size=2, grad_accum=2, compute=ScoringConfig(logprob_chunk=0), row_tokens=96, bucket_multiple=16
    )
    step = run.replace(pack_shapes="step")
    short = np.arange(4, 8)  # the short pairs only
    a, b = step_batch(enc, ref, short, run, 0), step_batch(enc, ref, short, step, 0)
    assert a["tokens"].shape[-1] == 96 and b["tokens"].shape[-1] == 80  # one row of the 4 pairs (67), rounded to 16
    ga, ma = accumulated_grads(params, a, config, run)
    gb, mb = accumulated_grads(params, b, config, step)
    for name in ma:
        np.testing.assert_allclose(mb[name], ma[name], atol=1e-5, rtol=1e-5, err_msg=name)
    for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
