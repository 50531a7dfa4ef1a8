"""The one table between Hugging Face tensor names and the lidr_jax params pytree, used both ways.

Import (`params_from_hf`) and export (`hf_from_params`) read the same `_TABLE`, so a layout change
is made once. Every shape is asserted and every key consumed: a missing or unexpected tensor is an
error that names it (a silently ignored tensor is how a model ends up half random).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import param_specs


class WeightsMismatchError(ValueError):
    """The checkpoint's tensors do not match the architecture its config describes."""


class ModelFileError(ValueError):
    """A model file cannot be read: truncated or damaged weights, a JSON file that is not UTF-8 or not
    JSON, or a directory without the tokenizer files a model needs. The message names the file."""


# (params path, HF name with {i} for the layer, to_ours(hf_array, config), to_hf(our_array, config))
def _t(a, c):  # [out, in] Linear weight -> [in, out]
    return a.T


def _q_in(a, c):  # q_proj [N*H, D] -> [D, N, H]
    return a.T.reshape(c.hidden_size, c.num_attention_heads, c.head_dim)


def _q_out(a, c):
    return a.reshape(c.hidden_size, -1).T


def _kv_in(a, c):  # k/v_proj [K*H, D] -> [D, K, H]
    return a.T.reshape(c.hidden_size, c.num_key_value_heads, c.head_dim)


def _o_in(a, c):  # o_proj [D, N*H] -> [N, H, D]
    return a.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size)


def _o_out(a, c):
    return a.reshape(-1, c.hidden_size).T


def _qb_in(a, c):
    return a.reshape(c.num_attention_heads, c.head_dim)


def _kvb_in(a, c):
    return a.reshape(c.num_key_value_heads, c.head_dim)


def _flat(a, c):
    return a.reshape(-1)


def _same(a, c):
    return a


_LAYER_TABLE: list[tuple[str, str, Callable, Callable]] = [
    ("attn_norm", "model.layers.{i}.input_layernorm.weight", _same, _same),
    ("wq", "model.layers.{i}.self_attn.q_proj.weight", _q_in, _q_out),
    ("wk", "model.layers.{i}.self_attn.k_proj.weight", _kv_in, _q_out),
    ("wv", "model.layers.{i}.self_attn.v_proj.weight", _kv_in, _q_out),
    ("wo", "model.layers.{i}.self_attn.o_proj.weight", _o_in, _o_out),
    ("mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", _same, _same),
    ("w_gate", "model.layers.{i}.mlp.gate_proj.weight", _t, _t),
    ("w_up", "model.layers.{i}.mlp.up_proj.weight", _t, _t),
    ("w_down", "model.layers.{i}.mlp.down_proj.weight", _t, _t),
]
_BIAS_TABLE = [
    ("bq", "model.layers.{i}.self_attn.q_proj.bias", _qb_in, _flat),
    ("bk", "model.layers.{i}.self_attn.k_proj.bias", _kvb_in, _flat),
    ("bv", "model.layers.{i}.self_attn.v_proj.bias", _kvb_in, _flat),
]
_TOP_TABLE = [
    ("embed", "model.embed_tokens.weight", _same, _same),
    ("final_norm", "model.norm.weight", _same, _same),
]
_LM_HEAD = ("lm_head", "lm_head.weight", _t, _t)


def _tables(config: ModelConfig):
    layer = _LAYER_TABLE + (_BIAS_TABLE if config.attention_bias else [])
    top = _TOP_TABLE + ([] if config.tie_word_embeddings else [_LM_HEAD])
    return layer, top


def hf_names(config: ModelConfig) -> list[str]:
    """Every tensor name a Hugging Face checkpoint of this architecture has."""
    layer, top = _tables(config)
    names = [name for _, name, _, _ in top]
    for i in range(config.num_hidden_layers):
        names += [name.format(i=i) for _, name, _, _ in layer]
    return names


def params_from_hf(
    get: Callable[[str], np.ndarray],
    names: set[str],
    config: ModelConfig,
    *,
    source: str = "checkpoint",
) -> dict:
    """Build the params pytree (numpy, `config.param_dtype`) from HF tensors.

    `get(name)` returns one tensor; `names` is every tensor the checkpoint has. A checkpoint of a tied
    model may still carry `lm_head.weight` (a copy of the embedding); it is accepted and ignored.
    """
    specs = param_specs(config)
    expected = set(hf_names(config))
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    ignorable |= {n for n in names if n.endswith("rotary_emb.inv_freq")}
    missing = sorted(expected - names)
    unexpected = sorted(names - expected - ignorable)
    if missing:
        raise WeightsMismatchError(f"{source} lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise WeightsMismatchError(
            f"{source} has unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            "that the config does not explain"
        )
    dtype = jnp.dtype(config.param_dtype)  # a numpy dtype; bfloat16 comes from ml_dtypes

    def convert(a: np.ndarray, to_ours, spec_shape, name):
        try:
            out = to_ours(np.asarray(a), config)
        except ValueError:  # a reshape that cannot work: the same error as a shape that maps wrongly
            out = a
        if tuple(out.shape) != tuple(spec_shape):
            raise WeightsMismatchError(
                f"{source}: tensor {name} has shape {tuple(a.shape)}, expected one that maps to {tuple(spec_shape)}"
            )
        return out.astype(dtype, copy=False)

    layer_table, top_table = _tables(config)
    params: dict = {"layers": {}}
    for key, name, to_ours, _ in top_table:
        params[key] = convert(get(name), to_ours, specs[key].shape, name)
    for key, name, to_ours, _ in layer_table:
        per_layer_shape = specs["layers"][key].shape[1:]
        stacked = [
            convert(get(name.format(i=i)), to_ours, per_layer_shape, name.format(i=i))
            for i in range(config.num_hidden_layers)
        ]
        params["layers"][key] = np.stack(stacked)
    return params


def hf_from_params(params: Mapping, config: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor name -> numpy array (in the params' dtype); tied embeddings written once."""
    layer_table, top_table = _tables(config)
    out = {}
    for key, name, _, to_hf in top_table:
        out[name] = np.ascontiguousarray(to_hf(np.asarray(params[key]), config))
    for key, name, _, to_hf in layer_table:
        stacked = np.asarray(params["layers"][key])
        for i in range(config.num_hidden_layers):
            out[name.format(i=i)] = np.ascontiguousarray(to_hf(stacked[i], config))
    return out
