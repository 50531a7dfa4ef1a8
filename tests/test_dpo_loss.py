"""DPO losses and metrics against a NumPy implementation written from the papers' formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidr_jax.train.dpo import LOSS_TYPES, DPOConfig, dpo_terms


def dpo_loss(logp_c, logp_r, count_c, ref_c, ref_r, cfg, weight=None, count_r=None):
    """(mean loss, metrics) over the pairs of `dpo_terms`, each pair weighted by `weight` (default 1):
    what the trainer's step computes for one micro-batch (lidr_jax.train.trainer.accumulated_grads)."""
    w = jnp.ones_like(logp_c) if weight is None else weight
    total = jnp.maximum(jnp.sum(w), 1e-9)
    loss_B, per_pair = dpo_terms(logp_c, logp_r, count_c, ref_c, ref_r, cfg, count_r)
    return jnp.sum(w * loss_B) / total, {k: jnp.sum(w * v) / total for k, v in per_pair.items()}


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def numpy_dpo(lc, lr, nc, rc, rr, w, loss_type, beta, eps, lam, nr=None):
    """Per-pair losses from the formulas (float64), then the weighted means of loss and metrics."""
    h = (lc - rc) - (lr - rr)
    if loss_type == "sigmoid":  # Rafailov 2023; cDPO label smoothing, Mitchell 2023
        pref = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    elif loss_type == "robust":  # Chowdhury et al. 2024
        pref = (-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":  # Azar et al. 2023, eq. 17, on length-averaged log-probs (TRL, LLaMA-Factory)
        pref = ((lc - rc) / nc - (lr - rr) / nr - 1 / (2 * beta)) ** 2
    else:  # hinge, SLiC: max(0, 1 - beta h)
        pref = np.maximum(0.0, 1 - beta * h)
    nll = -lc / nc

    def mean(x):
        return float(np.sum(w * x) / np.sum(w))

    rc_, rr_ = beta * (lc - rc), beta * (lr - rr)
    return mean(pref + lam * nll), {
        "nll_loss": mean(nll),
        "dpo_loss": mean(pref),
        "rewards/chosen": mean(rc_),
        "rewards/rejected": mean(rr_),
        "rewards/margins": mean(rc_ - rr_),
        "rewards/accuracies": mean((rc_ > rr_).astype(float)),
        "logps/chosen": mean(lc),
        "logps/rejected": mean(lr),
    }


def _random_logps(seed, B=16):
    rng = np.random.default_rng(seed)
    lc, lr = -rng.uniform(5, 80, B), -rng.uniform(5, 80, B)
    rc, rr = lc + rng.normal(0, 3, B), lr + rng.normal(0, 3, B)
    nc = rng.integers(1, 60, B).astype(np.float64)
    w = (rng.uniform(size=B) > 0.2).astype(np.float64)
    w[0] = 1.0
    return lc, lr, nc, rc, rr, w


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_losses_match_numpy_formulas(loss_type, eps):
    cfg = DPOConfig(loss_type=loss_type, beta=0.3, label_smoothing=eps, nll_weight=0.7)
    lc, lr, nc, rc, rr, w = _random_logps(seed=LOSS_TYPES.index(loss_type) * 10 + int(eps * 10))
    nr = nc[::-1].copy()  # the rejected answers' token counts (averaged IPO)
    want_loss, want = numpy_dpo(lc, lr, nc, rc, rr, w, loss_type, 0.3, eps, 0.7, nr)
    with jax.enable_x64(True):  # compare formulas, not float32 rounding
        loss, metrics = dpo_loss(
            *map(jnp.asarray, (lc, lr, nc, rc, rr)), cfg, weight=jnp.asarray(w), count_r=jnp.asarray(nr)
        )
        loss, metrics = float(loss), {k: float(v) for k, v in metrics.items()}
    assert abs(loss - want_loss) <= 1e-6 * max(1.0, abs(want_loss))
    for name, value in want.items():
        assert abs(metrics[name] - value) <= 1e-6 * max(1.0, abs(value)), name
    assert metrics["loss"] == pytest.approx(loss, abs=1e-12)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1)])
def test_policy_equal_reference_gives_log2_and_zero_rewards(loss_type, eps):
    rng = np.random.default_rng(1)
    lc, lr = jnp.asarray(-rng.uniform(5, 50, 8), jnp.float32), jnp.asarray(-rng.uniform(5, 50, 8), jnp.float32)
    cfg = DPOConfig(loss_type=loss_type, label_smoothing=eps, nll_weight=0.0)
    loss, m = dpo_loss(lc, lr, jnp.full(8, 10.0), lc, lr, cfg)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(m[name]) == 0.0, name


def test_nll_term_is_length_averaged_chosen_nll_times_weight():
    lc, lr = jnp.array([-20.0, -9.0]), jnp.array([-30.0, -3.0])
    count = jnp.array([10.0, 3.0])
    base, _ = dpo_loss(lc, lr, count, lc, lr, DPOConfig(nll_weight=0.0))
    loss, m = dpo_loss(lc, lr, count, lc, lr, DPOConfig(nll_weight=2.0))
    assert float(m["nll_loss"]) == pytest.approx((2.0 + 3.0) / 2, abs=1e-6)  # mean of 20/10 and 9/3
    assert float(loss) == pytest.approx(float(base) + 2.0 * 2.5, abs=1e-6)


def test_loss_gradient_flows_only_through_policy_logps():
    cfg = DPOConfig()
    grad = jax.grad(lambda x: dpo_loss(x[0], x[1], jnp.ones(1) * 4, jnp.array([-5.0]), jnp.array([-5.0]), cfg)[0])
    g = grad(jnp.array([[-5.0], [-5.0]]))
    # d/d logπ(c) of −log σ(β h) − logπ(c)/4 at h = 0 is −β/2 − 1/4; d/d logπ(r) is +β/2.
    assert float(g[0, 0]) == pytest.approx(-0.05 - 0.25, abs=1e-6)
    assert float(g[1, 0]) == pytest.approx(0.05, abs=1e-6)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match=r"loss_type must be one of \[.*\], got 'kto'"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match=r"label_smoothing must be >= 0 and < 0.5, got 0.5"):
        DPOConfig(label_smoothing=0.5)
