"""The train step and loop: gradient accumulation is exact, a short run learns the preferences,
NaN stops training with the last good state, the data order is a function of the step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dpo_helpers import PAIRS, tiny_model

from lidr_jax.model.scoring import ScoringConfig
from lidr_jax.train.dpo import DPOConfig, dpo_terms
from lidr_jax.train.pairs import PreferencePair, encode_pairs
from lidr_jax.train.trainer import (
    NonFiniteLossError,
    accumulated_grads,
    lr_schedule,
    make_optimizer,
    reference_logprobs,
    step_batch,
    step_indices,
    train,
)


@pytest.fixture(scope="module")
def setup():
    config, params, tok = tiny_model()
    # 16 pairs: the 8 base pairs and the same with a second phrasing of the prompt
    pairs = [PreferencePair(p, c, r) for p, c, r in PAIRS] + [PreferencePair("Please. " + p, c, r) for p, c, r in PAIRS]
    enc = encode_pairs(pairs, tok, max_prompt_len=48, max_response_len=16)
    return config, params, tok, enc


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_grad_accumulation_1x8_equals_4x2(setup):
    config, params, _, enc = setup
    rng = np.random.default_rng(0)
    ref = {
        "chosen": -rng.uniform(5, 30, len(enc)).astype(np.float32),
        "rejected": -rng.uniform(5, 30, len(enc)).astype(np.float32),
    }
    idx = np.arange(8)
    results = []
    for b, a in ((8, 1), (2, 4)):
        cfg = DPOConfig(
            batch_size=b, grad_accum=a, learning_rate=1e-3, warmup=0, compute=ScoringConfig(logprob_chunk=16)
        )
        batch = step_batch(enc, ref, idx, cfg, pad_id=0, length=96)
        assert batch["tokens"].shape == (a, b, 96)
        opt = make_optimizer(cfg, 10)

        def grads_and_update(p, x, cfg=cfg, opt=opt):  # what make_train_step does, grads exposed
            grads, metrics = accumulated_grads(p, x, config, cfg)
            updates, _ = opt.update(grads, opt.init(p), p)
            return grads, metrics, updates

        grads, metrics, updates = jax.jit(grads_and_update)(params, batch)
        results.append((_flat(grads), metrics, _flat(updates)))
    (g1, m1, u1), (g2, m2, u2) = results
    assert np.abs(g1).max() > 1e-3  # the comparison is not between zeros
    np.testing.assert_allclose(g2, g1, rtol=0, atol=1e-5 * np.abs(g1).max())
    # Adam's first update is u = -lr·g/(|g| + eps), whose slope in g is lr·eps/(|g| + eps)²: where a
    # gradient is near eps (~1e-8) it amplifies the float32 summation-order difference of the two
    # gradients. So each update element is held to the error propagated from its own gradient
    # difference (twice the first-order bound) plus float32 rounding of the update itself.
    # Adam sees the gradients after global-norm clipping (max_grad_norm 1.0).
    lr, eps = 1e-3, DPOConfig().adam_eps
    c1, c2 = (g * min(1.0, DPOConfig().max_grad_norm / np.linalg.norm(g)) for g in (g1, g2))
    assert np.abs(u1).max() > 0.5e-3
    bound = 2 * lr * np.abs(c2 - c1) * eps / (np.minimum(np.abs(c1), np.abs(c2)) + eps) ** 2 + 1e-6 * lr
    assert np.all(np.abs(u2 - u1) <= bound), np.max(np.abs(u2 - u1) - bound)
    well_conditioned = np.abs(g1) > 1e-3 * np.abs(g1).max()  # most weights: the same update to 1e-5·lr
    assert well_conditioned.mean() > 0.5
    np.testing.assert_allclose(u2[well_conditioned], u1[well_conditioned], rtol=0, atol=1e-5 * lr)
    for name in m1:
        assert float(m2[name]) == pytest.approx(float(m1[name]), rel=1e-5, abs=1e-6), name


def test_short_run_lowers_loss_and_raises_accuracy(setup, tmp_path):
    config, params, _, enc = setup
    cfg = DPOConfig(
        learning_rate=3e-3,
        warmup=0,
        schedule="constant",
        epochs=6,
        batch_size=4,
        grad_accum=2,
        beta=0.1,
        nll_weight=1.0,
        compute=ScoringConfig(logprob_chunk=16, batch_size=16),
    )
    ref = reference_logprobs(params, config, enc, cfg, progress=False)

    def evaluate(p):
        pol = reference_logprobs(p, config, enc, cfg, progress=False)
        count = jnp.asarray([len(c) for c in enc.chosen_ids], jnp.float32)
        loss_B, m = dpo_terms(
            jnp.asarray(pol["chosen"]),
            jnp.asarray(pol["rejected"]),
            count,
            jnp.asarray(ref["chosen"]),
            jnp.asarray(ref["rejected"]),
            cfg,
        )
        return float(jnp.mean(loss_B)), float(jnp.mean(m["rewards/accuracies"]))

    loss0, acc0 = evaluate(params)
    metrics_file = tmp_path / "metrics.jsonl"
    seen = []
    state = train(
        params,
        config,
        enc,
        ref,
        cfg,
        metrics_path=metrics_file,
        progress=False,
        callback=lambda s, m: seen.append(int(s.step)),
    )
    loss1, acc1 = evaluate(state.params)
    assert loss1 < loss0 - 0.1
    assert acc0 == 0.0 and acc1 >= 0.75
    assert seen == list(range(1, 13)) and int(state.step) == 12
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for name in (
        "loss",
        "nll_loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
        "tokens_per_s",
    ):
        assert np.isfinite(rows[-1][name]), name
    # step 1: policy = reference, so the DPO part is log 2 and every reward 0
    assert rows[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["learning_rate"] == pytest.approx(3e-3)


def test_nan_loss_stops_with_last_good_state(setup):
    config, params, _, enc = setup
    cfg = DPOConfig(
        learning_rate=1e-3,
        warmup=0,
        batch_size=4,
        epochs=1,
        compute=ScoringConfig(logprob_chunk=16, remat="full", compute_dtype="bfloat16"),
    )
    ref = {"chosen": np.full(len(enc), -20.0, np.float32), "rejected": np.full(len(enc), -20.0, np.float32)}
    bad_pair = int(step_indices(2, len(enc), cfg)[0])  # first pair of the third step
    ref["chosen"][bad_pair] = np.nan
    saved = []
    with pytest.raises(NonFiniteLossError, match="step 3: loss=nan .* not finite") as err:
        train(
            params,
            config,
            enc,
            ref,
            cfg,
            progress=False,
            callback=lambda s, m: saved.append(jax.tree.map(np.array, s.params)),
        )
    state = err.value.state
    assert int(state.step) == 2 and len(saved) == 2
    # the bad update was not applied: the state is the one saved after step 2 (bf16 compute, float32 master)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved[1])):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), b)


def test_data_order_depends_only_on_step():
    cfg = DPOConfig(batch_size=2, grad_accum=2, seed=3)
    epoch0 = np.concatenate([step_indices(k, 10, cfg) for k in range(3)])
    assert sorted(epoch0.tolist()) == list(range(10))  # every pair once per epoch, last step short
    assert len(step_indices(2, 10, cfg)) == 2
    np.testing.assert_array_equal(step_indices(4, 10, cfg), step_indices(4, 10, cfg))
    assert not np.array_equal(np.concatenate([step_indices(k, 10, cfg) for k in range(3, 6)]), epoch0)


def test_lr_schedule_warmup_then_decay():
    cos = lr_schedule(DPOConfig(learning_rate=1.0, warmup=0.2, schedule="cosine"), 10)
    lin = lr_schedule(DPOConfig(learning_rate=1.0, warmup=2, schedule="linear"), 10)
    assert [float(cos(s)) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-6)
    assert [float(lin(s)) for s in (1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 0.5, 0.0], abs=1e-6)


def test_micro_batches_take_a_share_for_every_device_and_keep_the_gradients(setup):
    """2 rows x 4 micro-batches on a mesh splitting rows 8 or 16 ways: rows the mesh cannot split would be
    whole on every device, so the step's 8 pairs go in one micro-batch of 8 (or 16, 8 of them filler of
    weight 0); the gradients are those of the configured split."""
    from lidr_jax.train.trainer import micro_batch_rows

    config, params, _, enc = setup
    rng = np.random.default_rng(1)
    ref = {k: -rng.uniform(5, 30, len(enc)).astype(np.float32) for k in ("chosen", "rejected")}
    cfg = DPOConfig(batch_size=2, grad_accum=4, compute=ScoringConfig(logprob_chunk=16))
    assert [micro_batch_rows(cfg, n) for n in (1, 2, 3, 8, 16)] == [(2, 4), (2, 4), (3, 3), (8, 1), (16, 1)]
    grads = {}
    for split, shape in ((1, (4, 2, 96)), (8, (1, 8, 96)), (16, (1, 16, 96)), (3, (3, 3, 96))):
        batch = step_batch(enc, ref, np.arange(8), cfg, pad_id=0, length=96, split=split)
        assert batch["tokens"].shape == shape
        assert batch["weight"].sum() == 8 and set(np.unique(batch["weight"])) <= {0.0, 1.0}
        grads[split] = _flat(jax.jit(lambda p, x: accumulated_grads(p, x, config, cfg)[0])(params, batch))
    for split in (8, 16, 3):
        np.testing.assert_allclose(grads[split], grads[1], rtol=0, atol=1e-5 * np.abs(grads[1]).max())
