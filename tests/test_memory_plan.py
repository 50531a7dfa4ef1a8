"""The memory plan (lidr_jax.train.memory): state bytes from shapes and shardings, activations per attention
implementation, and the fit check that refuses a configuration that does not fit, naming the numbers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lidr_jax.model.llama import abstract_params, count_params
from lidr_jax.model.scoring import ScoringConfig
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.memory import (
    DoesNotFitError,
    GiB,
    MemoryPlan,
    check_fit,
    check_training_fits,
    plan_memory,
    state_bytes,
)
from tests.dpo_helpers import tiny_config


def test_state_bytes_follow_the_mesh():
    config = tiny_config()
    n = count_params(abstract_params(config))
    params, adamw = state_bytes(config, (1, 1, 1))
    assert params == 4 * n
    assert adamw >= 2 * 4 * n  # mu and nu (float32) plus the step counters
    sharded, sharded_adamw = state_bytes(config, (1, 4, 1))
    assert sharded < params / 2 and sharded_adamw < adamw / 2


def test_fused_attention_keeps_no_scores():
    cfg = DPOConfig(row_tokens=256, batch_size=2, compute=ScoringConfig(logprob_chunk=64))
    xla = plan_memory(tiny_config(), cfg, (1, 1, 1))
    fused = plan_memory(tiny_config(), cfg, (1, 1, 1), fused_attention=True)
    # xla keeps the softmax probabilities of each packed row's block pairs (two 128-token blocks: 3 pairs),
    # [rows, M, K, G, C, C] float32, in both layers; fused kernels do not
    probs = 2 * 2 * 4 * 3 * 128 * 128 * 4
    assert xla.activations - fused.activations >= probs
    assert (xla.params, xla.adamw, xla.grads) == (fused.params, fused.adamw, fused.grads)


def test_fit_check_refuses_with_the_numbers():
    plan = MemoryPlan(
        mesh=(1, 8, 1),
        rows=1,
        row_tokens=4096,
        attention="fused",
        remat="full",
        params=4 * GiB,
        adamw=8 * GiB,
        grads=8 * GiB,
        activations=GiB // 2,
        transient=GiB // 4,
    )
    check_fit(plan, 21 * GiB)  # 20.75 GiB fits
    with pytest.raises(DoesNotFitError) as e:
        check_fit(plan, 16 * GiB, "TPU v5e chip")
    assert str(e.value) == (
        "DPO training needs 20.75 GiB per device on a (data, fsdp, tensor) = (1, 8, 1) mesh (params 4.00 GiB, "
        "adamw 8.00 GiB, grads 8.00 GiB, activations 0.50 GiB, transient 0.25 GiB; 1 row(s) of 4096 tokens per "
        "device, attention fused, remat full), but each TPU v5e chip has 16.00 GiB: use more devices (a larger "
        "fsdp axis), remat, a smaller batch_size or row_tokens, or bfloat16 compute"
    )


def test_fit_check_refuses_a_real_plan_on_a_smaller_mesh():
    cfg = DPOConfig(row_tokens=128, batch_size=4)
    big = plan_memory(tiny_config(), cfg, (1, 4, 1))
    small = plan_memory(tiny_config(), cfg, (1, 1, 1))
    assert small.total > big.total
    check_fit(big, small.total - 1)
    with pytest.raises(DoesNotFitError, match=r"needs \d+\.\d\d (MiB|GiB) per device on a .* = \(1, 1, 1\) mesh"):
        check_fit(small, small.total - 1)


class _Chip:
    platform, device_kind = "tpu", "TPU v5 lite"
    process_index = 0  # this process's (the only one the memory of which JAX reports)

    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return {"bytes_limit": self.limit}


class _Mesh:  # what check_training_fits reads of a jax Mesh: its devices and axis sizes
    def __init__(self, limit, fsdp):
        self.devices = np.array([_Chip(limit)] * fsdp)
        self.shape = {"data": 1, "fsdp": fsdp, "tensor": 1}


def test_training_on_a_smaller_mesh_is_refused_before_it_starts():
    cfg = DPOConfig(row_tokens=128, batch_size=4, compute=ScoringConfig(attention="xla"))
    needed = plan_memory(tiny_config(), cfg, (1, 4, 1)).total
    assert check_training_fits(tiny_config(), cfg, _Mesh(needed, 4)).total == needed
    with pytest.raises(DoesNotFitError, match=r"= \(1, 2, 1\) mesh .* but each TPU v5 lite has \d+\.\d\d MiB"):
        check_training_fits(tiny_config(), cfg, _Mesh(needed, 2))


def test_no_check_where_the_backend_reports_no_limit():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    assert check_training_fits(tiny_config(), DPOConfig(), mesh) is None
