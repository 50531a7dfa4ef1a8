"""The real Llama-3-8B / Llama-3.1-8B architectures, built abstractly: config parsing, parameter count,
and a traced forward pass, all with `jax.eval_shape` (no 8B weights are ever allocated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidr_jax.formats.hf_table import hf_names
from lidr_jax.model.config import config_from_hf
from lidr_jax.model.llama import abstract_params, count_params, forward

# config.json of meta-llama/Meta-Llama-3-8B, as published.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
# config.json of meta-llama/Llama-3.1-8B-Instruct, as published.
LLAMA31_8B = {
    **LLAMA3_8B,
    "eos_token_id": [128001, 128008, 128009],
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "transformers_version": "4.42.3",
}
PARAMS_8B = 8_030_261_248


def test_llama3_8b_config():
    c = config_from_hf(LLAMA3_8B)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (128256, 4096, 14336, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_groups) == (32, 8, 128, 4)
    assert (c.rope_type, c.rope_theta, c.tie_word_embeddings, c.attention_bias) == ("default", 500000.0, False, False)
    assert (c.bos_token_id, c.eos_token_ids) == (128000, (128001,))


def test_llama31_8b_config_and_rope():
    c = config_from_hf(LLAMA31_8B)
    assert c.rope_type == "llama3" and dict(c.rope_scaling)["factor"] == 8.0
    assert c.eos_token_ids == (128001, 128008, 128009) and c.max_position_embeddings == 131072
    # Same frequencies as transformers' llama3 rope initialisation (torch only builds a [64] vector here).
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**LLAMA31_8B), torch.device("cpu"))
    np.testing.assert_allclose(c.inv_freq(), ref.numpy(), rtol=1e-6)
    assert not np.allclose(c.inv_freq(), config_from_hf(LLAMA3_8B).inv_freq())


@pytest.mark.parametrize("hf", [LLAMA3_8B, LLAMA31_8B], ids=["llama3_8b", "llama31_8b"])
def test_abstract_params_count_without_allocation(hf):
    config = config_from_hf(hf, param_dtype="bfloat16", dtype="bfloat16")
    live_before = len(jax.live_arrays())
    params = abstract_params(config)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # shapes only, no buffers
    assert count_params(params) == PARAMS_8B
    assert {x.dtype for x in leaves} == {jnp.dtype("bfloat16")}
    assert params["layers"]["wq"].shape == (32, 4096, 32, 128)
    assert params["layers"]["wk"].shape == (32, 4096, 8, 128)
    assert params["lm_head"].shape == (4096, 128256)
    assert len(hf_names(config)) == 2 + 1 + 32 * 9  # embed, norm, lm_head + 9 tensors per layer
    # The whole forward pass traces at 8B, abstractly.
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    logits = jax.eval_shape(lambda p, t: forward(p, t, config), params, tokens)
    assert (logits.shape, logits.dtype) == ((2, 16, 128256), jnp.float32)
    assert len(jax.live_arrays()) - live_before < 10  # at most a few small constants, never a weight
    assert all(a.size < 10_000_000 for a in jax.live_arrays())
