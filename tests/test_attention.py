"""Attention implementations (lidr_jax.model.attention) against xla on CPU, within 1e-5 in float32.

What runs here: the cudnn path's code with jax.nn.dot_product_attention's XLA backend (`jax_nn`: the same
layout, mask and call; cuDNN itself needs an NVIDIA GPU) and Pallas splash attention in interpret mode
(`splash_interpret`; the TPU kernel itself needs a TPU). `resolve`'s choices per backend are checked by
name, without the hardware.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from lidr_jax.model import attention as attn
from lidr_jax.model.llama import forward_cached, init_cache
from lidr_jax.train.packing import first_fit, packed_batch, packed_logprobs, pair_tokens, plan_packing
from lidr_jax.train.pairs import EncodedPairs
from tests.dpo_helpers import numpy_init, tiny_config


@pytest.fixture(scope="module")
def model():
    config = tiny_config()
    params = jax.tree.map(lambda a: a * 3.0 if a.ndim > 1 else a, numpy_init(config, seed=4))
    return config, params


def _pairs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 12, (n, 3))
    return EncodedPairs(*[[rng.integers(4, 128, k).astype(np.int32) for k in sizes[:, j]] for j in range(3)])


def _packed(enc, share_prompt, row_tokens=128):
    idx = list(range(len(enc)))
    plan = plan_packing(enc, [idx], row_tokens, 1, share_prompt)
    rows = [[idx[j] for j in row] for row in first_fit(pair_tokens(enc, share_prompt), row_tokens)]
    batch = packed_batch(enc, rows, 0, plan)
    return batch, batch.pop("pair").reshape(-1)


def _by_pair(values, pair):
    real = pair >= 0
    out = np.zeros(int(pair.max()) + 1, np.float32)
    out[pair[real]] = np.asarray(values)[real]
    return out


def test_resolve_per_backend():
    assert attn.resolve("auto", platform="cpu") == "xla"
    assert attn.resolve("xla", platform="gpu") == "xla"
    assert attn.resolve("auto", platform="gpu", dtype="bfloat16", shared_prompt=True, cache=True) == "cudnn"
    assert attn.resolve("auto", platform="tpu", shared_prompt=False) == "splash"
    with pytest.raises(ValueError, match=r"attention=cudnn: cuDNN attention needs an NVIDIA GPU \(backend: cpu\)"):
        attn.resolve("cudnn", platform="cpu")
    with pytest.raises(ValueError, match="splash segment ids cannot express a prompt shared by two answers"):
        attn.resolve("splash", platform="tpu", shared_prompt=True)
    with pytest.raises(ValueError, match="choose one of"):
        attn.resolve("flash", platform="cpu")
    attn._said.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert attn.resolve("auto", platform="tpu", cache=True) == "xla"
            assert attn.resolve("auto", platform="gpu", dtype="float32") == "xla"
    assert [str(w.message) for w in caught] == [
        "attention auto: using xla, not splash: splash attention has no KV-cache path here",
        "attention auto: using xla, not cudnn: cuDNN flash attention runs in bfloat16/float16, not float32 "
        "(set compute_dtype: bfloat16)",
    ]


@pytest.mark.parametrize("share_prompt", [True, False])
def test_jax_nn_path_equals_xla_with_segments(model, share_prompt):
    config, params = model
    batch, pair = _packed(_pairs(), share_prompt)
    assert batch["weight"].sum(axis=1).max() >= 2  # several pairs per row
    want = packed_logprobs(params, batch, config, chunk=0)
    got = packed_logprobs(params, batch, config, chunk=0, attention="jax_nn")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_prompt_once_per_answer_equals_shared_prompt(model):
    config, params = model
    enc = _pairs()
    shared = [_by_pair(v, _packed(enc, True)[1]) for v in packed_logprobs(params, _packed(enc, True)[0], config)]
    batch, pair = _packed(enc, False)
    twice = [_by_pair(v, pair) for v in packed_logprobs(params, batch, config)]
    for a, b in zip(twice, shared, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_splash_interpret_equals_xla(model):
    config, params = model
    batch, _ = _packed(_pairs(), share_prompt=False, row_tokens=128)
    want = packed_logprobs(params, batch, config, chunk=0)
    got = packed_logprobs(params, batch, config, chunk=0, attention="splash_interpret")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_jax_nn_path_equals_xla_with_a_cache(model):
    config, params = model
    rng = np.random.default_rng(1)
    prompt = rng.integers(4, 128, (2, 7)).astype(np.int32)
    mask = np.ones((2, 7), bool)
    mask[1, 5:] = False  # right padding: row 1 has 5 real tokens
    step = rng.integers(4, 128, (2, 1)).astype(np.int32)
    outs = {}
    for impl in ("xla", "jax_nn"):
        cache = init_cache(config, 2, 16)
        logits0, cache = forward_cached(params, prompt, config, cache, attention_mask_BT=mask, attention=impl)
        logits1, cache = forward_cached(params, step, config, cache, attention=impl)
        outs[impl] = (np.asarray(logits0)[mask], np.asarray(logits1))
    for a, b in zip(outs["jax_nn"], outs["xla"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
