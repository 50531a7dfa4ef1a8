"""`config_from_hf` on the config.json spellings found in the wild."""

from __future__ import annotations

import json

import jax
import pytest

from lidr_jax.model.config import ModelConfig, UnsupportedConfigError, config_from_hf, load_hf_config

BASE = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def cfg(**changes) -> ModelConfig:
    return config_from_hf({**BASE, **changes})


def test_qwen2_bias_is_implied_without_attention_bias():
    assert cfg(model_type="qwen2").attention_bias is True
    assert cfg(model_type="qwen2").rms_norm_eps == 1e-6  # qwen2's default differs from llama's
    assert cfg().attention_bias is False and cfg().rms_norm_eps == 1e-5
    assert cfg(attention_bias=True).attention_bias is True
    assert cfg(model_type="mistral").attention_bias is False


def test_tie_flags():
    assert cfg().tie_word_embeddings is False  # transformers' default for llama, mistral and qwen2
    assert cfg(tie_word_embeddings=True).tie_word_embeddings is True
    assert cfg(model_type="qwen2", tie_word_embeddings=True).tie_word_embeddings is True


@pytest.mark.parametrize(
    "eos, expected", [(2, (2,)), ([128001, 128008, 128009], (128001, 128008, 128009)), (None, ()), ([7], (7,))]
)
def test_eos_int_or_list(eos, expected):
    assert cfg(eos_token_id=eos).eos_token_ids == expected


def test_head_dim_explicit_derived_and_kv_heads_default():
    assert cfg().head_dim == 16
    assert cfg(head_dim=24).head_dim == 24
    assert cfg(head_dim=None).head_dim == 16
    no_kv = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    assert config_from_hf(no_kv).num_key_value_heads == 4  # absent -> multi-head attention
    with pytest.raises(UnsupportedConfigError, match="not a multiple"):
        cfg(num_key_value_heads=3)


def test_rope_spellings():
    assert (cfg().rope_type, cfg().rope_theta) == ("default", 10000.0)
    linear = cfg(rope_scaling={"type": "linear", "factor": 2.0})
    assert (linear.rope_type, linear.rope_scaling) == ("linear", (("factor", 2.0),))
    assert cfg(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}) == linear
    assert cfg(rope_parameters={"rope_type": "default", "rope_theta": 5e5}).rope_theta == 5e5
    with pytest.raises(UnsupportedConfigError, match="llama3 rope scaling needs"):
        cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(UnsupportedConfigError, match="per-layer-type"):
        cfg(rope_parameters={"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}})


def test_unsupported_fields_name_themselves():
    with pytest.raises(UnsupportedConfigError, match="hidden_act='gelu'"):
        cfg(hidden_act="gelu")
    with pytest.raises(UnsupportedConfigError, match="mlp_bias"):
        cfg(mlp_bias=True)
    with pytest.raises(UnsupportedConfigError, match="partial_rotary_factor"):
        cfg(partial_rotary_factor=0.5)
    with pytest.raises(UnsupportedConfigError, match="sliding_window=4096"):
        cfg(model_type="qwen2", use_sliding_window=True, sliding_window=4096)
    # qwen2 configs carry a sliding_window value that is off unless use_sliding_window is set.
    assert cfg(model_type="qwen2", use_sliding_window=False, sliding_window=4096).model_type == "qwen2"
    with pytest.raises(UnsupportedConfigError, match="param_dtype='float64'"):
        config_from_hf(BASE, param_dtype="float64")


def test_config_is_static_and_round_trips(tmp_path):
    c = cfg(
        model_type="qwen2",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        eos_token_id=[3, 4],
        bos_token_id=1,
    )
    assert hash(c) == hash(config_from_hf(c.to_hf_dict()))
    assert config_from_hf(c.to_hf_dict()) == c
    with pytest.raises(AttributeError):
        c.hidden_size = 8  # frozen
    f = jax.jit(lambda x, config: x * config.hidden_size, static_argnames=("config",))
    assert int(f(1, config=c)) == 64
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_dict()))
    assert load_hf_config(tmp_path) == c
    assert load_hf_config(tmp_path, param_dtype="bfloat16").param_dtype == "bfloat16"
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_config(tmp_path / "nowhere")
