"""Parity with transformers: tiny random HF checkpoints loaded by `load_pretrained` give the same logits.

Each architecture case runs twice: an unpadded batch, and a left-padded batch of different lengths
compared with transformers run on each unpadded sequence alone (only real-token logits compared).
Tolerance: max abs logit difference <= 1e-4 in float32 (measured ~1e-6; logits are O(1) because the
fixtures initialise with std 0.08).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax

from lidr_jax.config import config_from_hf
from lidr_jax.hf import load_pretrained
from lidr_jax.model import forward

TOL = 1e-4
# One compile per architecture: the unpadded batch passes an all-ones mask so both variants share it.
_forward = jax.jit(forward, static_argnames=("config",))

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # the test sequences run to position 39
}
CASES = {
    "gqa_tied": ("llama", dict(tie_word_embeddings=True, generation_eos=[2, 0])),
    "mha_untied_sharded": ("llama", dict(num_key_value_heads=4, max_shard_size="60KB", seed=1)),
    "llama3_rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500.0, seed=2)),
    "linear_rope_bf16_checkpoint": (
        "llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, torch_dtype="bfloat16", seed=3)
    ),
    "head_dim_24": ("llama", dict(head_dim=24, seed=4)),
    "qwen2_bias": ("qwen2", dict(seed=5)),
    "mistral": ("mistral", dict(seed=6)),
}


def _reference_logits(hf_model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, padded, make_hf_model, torch_model):
    model_type, kwargs = CASES[case]
    path = make_hf_model(model_type, **kwargs)
    model = load_pretrained(path)
    hf_model = torch_model(path)  # a bf16 checkpoint is upcast to float32 here, as ours is
    rng = np.random.default_rng(0)
    V, T = model.config.vocab_size, 40
    lengths = [T, T - 7, T - 19] if padded else [T, T, T]
    seqs = [rng.integers(4, V, size=n).tolist() for n in lengths]
    tokens_BT = np.zeros((len(seqs), T), np.int32)
    mask_BT = np.zeros((len(seqs), T), np.int32)
    for b, seq in enumerate(seqs):
        tokens_BT[b, T - len(seq):] = seq
        mask_BT[b, T - len(seq):] = 1
    logits = np.asarray(_forward(model.params, tokens_BT, model.config, attention_mask_BT=mask_BT))
    assert logits.shape == (len(seqs), T, V) and logits.dtype == np.float32
    for b, seq in enumerate(seqs):
        ref = _reference_logits(hf_model, seq)
        ours = logits[b, T - len(seq):]
        assert float(np.abs(ref).max()) > 0.3, "logits too small for the comparison to mean anything"
        diff = float(np.abs(ours - ref).max())
        assert diff <= TOL, f"{case} seq {b}: max abs logit diff {diff:.2e} > {TOL}"
        assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_loaded_model_fields(tiny_llama_dir):
    model = load_pretrained(tiny_llama_dir)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == (4, 2, 16, True)
    assert "lm_head" not in model.params
    assert model.generation_config["eos_token_id"] == [2, 0]
    assert model.tokenizer.eos_token_ids == (0, 2)  # generation_config's list plus the end-of-turn markers
    assert model.source == str(tiny_llama_dir)
    text = "Hello, мир! 你好"
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text


def test_param_and_compute_dtype(make_hf_model):
    path = make_hf_model("llama", seed=9)
    model = load_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")
    assert model.params["layers"]["wq"].dtype.name == "bfloat16"
    assert (model.config.param_dtype, model.config.dtype) == ("bfloat16", "bfloat16")


def test_rope_parameters_spelling_gives_same_config():
    """transformers 5 writes `rope_parameters` (theta inside); hub checkpoints have rope_theta + rope_scaling."""
    base = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = config_from_hf(dict(base, rope_theta=500000.0, rope_scaling=dict(scaling, rope_type="llama3")))
    new = config_from_hf(dict(base, rope_parameters=dict(scaling, rope_type="llama3", rope_theta=500000.0)))
    assert old == new
    assert (new.rope_type, new.rope_theta) == ("llama3", 500000.0)
    # The legacy "type" key also names the rope type.
    legacy = config_from_hf(dict(base, rope_theta=500000.0, rope_scaling=dict(scaling, type="llama3")))
    assert legacy == new
