"""IPO on length-averaged log-probs (TRL and LLaMA-Factory, the default) or summed (the IPO paper), by hand."""

import jax.numpy as jnp
import pytest

from lidr_jax.train.dpo import DPOConfig, preference_losses


def test_ipo_averaged_and_summed_by_hand():
    # chosen: logp -10 over 5 tokens, ref -12; rejected: logp -20 over 10 tokens, ref -18; beta 0.5.
    lc, lr, rc, rr = jnp.array([-10.0]), jnp.array([-20.0]), jnp.array([-12.0]), jnp.array([-18.0])
    # averaged: h = (2)/5 - (-2)/10 = 0.4 + 0.2 = 0.6; loss = (0.6 - 1)^2 = 0.16
    avg = preference_losses(lc, lr, rc, rr, DPOConfig(loss_type="ipo", beta=0.5), jnp.array([5.0]), jnp.array([10.0]))
    assert float(avg[0]) == pytest.approx(0.16, abs=1e-6)
    # summed: h = 2 - (-2) = 4; loss = (4 - 1)^2 = 9
    summed = preference_losses(lc, lr, rc, rr, DPOConfig(loss_type="ipo", beta=0.5, ipo_average=False))
    assert float(summed[0]) == pytest.approx(9.0, abs=1e-6)
    assert DPOConfig().ipo_average is True
    with pytest.raises(ValueError, match="ipo with ipo_average needs the token counts of both answers"):
        preference_losses(lc, lr, rc, rr, DPOConfig(loss_type="ipo"))
