"""The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2, SmolLM2) as pure functions.

Parameters are a plain nested dict of arrays. Layer weights are stacked on a leading layer axis and
the forward pass `lax.scan`s over them, so compile time does not grow with depth. `unstack_layers`
gives the other layout, a list of per-layer weight dicts, which the forward pass runs as an unrolled
Python loop: on XLA:CPU the scan copies every layer's weights out of the stacked arrays at every
step (a dynamic-slice is not fused into a library GEMM), which is a quarter of a decode step there, so
the sampler decodes with unstacked layers on a single CPU device (lidr_jax.generate.sampler.decode_params).

Shape key (used in names and einsum strings):
    B batch        T query positions   S key/value positions (cache slots)
    D model width  F mlp width         V vocabulary          L layers
    N query heads  K key/value heads   G = N // K (GQA group) H head dim

Every weight is declared once in `param_specs` with its shape, logical axis names and initializer;
sharding (lidr_jax.dist.sharding) maps the logical names to mesh axes.

Attention always runs against a key/value buffer of S slots with a validity mask. Without a cache the
buffer is the T tokens themselves; with a cache (`init_cache`) the T new tokens are written at slot
`cache["index"]` and attend to every valid earlier slot. Prefill and one-token decode are therefore the
same code, and a left-padded batch is just a batch whose padding slots are invalid.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lidr_jax.dist.sharding import constrain
from lidr_jax.model.config import ModelConfig

Params = dict[str, Any]
Cache = dict[str, jax.Array]

# A finite "minus infinity": a row whose keys are all masked (a padding query) then gets a uniform
# softmax instead of NaN, and NaN never reaches the gradients.
_MASKED = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: its shape, a logical axis name per dimension, and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"  # "normal" (std 0.02, as transformers initialises Llama), "ones", "zeros"


def param_specs(config: ModelConfig) -> Params:
    """The params pytree, with a `ParamSpec` at every leaf."""
    c = config
    L, D, F, V = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "wq": ParamSpec((L, D, N, H), ("layers", "embed", "q_heads", "head_dim")),
        "wk": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "wv": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "wo": ParamSpec((L, N, H, D), ("layers", "q_heads", "head_dim", "embed")),
        "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
    }
    if c.attention_bias:
        layers["bq"] = ParamSpec((L, N, H), ("layers", "q_heads", "head_dim"), "zeros")
        layers["bk"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["bv"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    params = {
        "embed": ParamSpec((V, D), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("norm",), "ones"),
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return params


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(config: ModelConfig) -> Params:
    """The logical axis names of every parameter, as a pytree of tuples matching the params."""
    return jax.tree.map(lambda s: s.axes, param_specs(config), is_leaf=_is_spec)


def init_params(config: ModelConfig, key: jax.Array) -> Params:
    """Random parameters (std 0.02 normal, norms one, biases zero) in `config.param_dtype`."""
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(config.param_dtype)

    def make(spec: ParamSpec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (0.02 * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def abstract_params(config: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` for every parameter, with no allocation."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def count_params(params_or_abstract: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_or_abstract))


# --------------------------------------------------------------------------------------------- cache


def init_cache(
    config: ModelConfig, batch: int, max_len: int, dtype: str | None = None, *, per_layer: bool = False
) -> Cache:
    """An empty KV cache of `max_len` slots: k/v [L, B, K, S, H], slot validity [B, S], next slot.
    With `per_layer` (for unstacked params, see `unstack_layers`), k/v are lists of L [B, K, S, H].

    Heads before slots: attention contracts over H with (B, K) as batch dimensions, so this layout
    feeds the matmuls without a transpose of the cache (measured 1.6x faster decode attention on CPU
    than [L, B, S, K, H])."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    kv_axes = ("layers", "batch", "kv_heads", "seq", "head_dim")  # sharded only under an active mesh
    if per_layer:
        empty = lambda: [constrain(jnp.zeros(shape[1:], dtype), kv_axes[1:]) for _ in range(shape[0])]
    else:
        empty = lambda: constrain(jnp.zeros(shape, dtype), kv_axes)
    return {
        "k": empty(),
        "v": empty(),
        "valid_BS": constrain(jnp.zeros((batch, max_len), bool), ("batch", "seq")),
        # A Python 0, not an array: inside a jitted prefill the cache is then statically empty and
        # attention skips it (XLA would otherwise constant-fold the all-masked scores: 16 s of compile
        # time for a SmolLM2 prefill at B=32). Returned caches carry an int32 array.
        "index": 0,
    }


# ------------------------------------------------------------------------------------------- layers


def rms_norm(x, weight, eps: float):
    """RMSNorm in float32 (as transformers does), scaled by the weight in the input dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions_BT, config: ModelConfig):
    """cos/sin [B, T, H] in float32 for Hugging Face's split-halves rotary layout."""
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(config.inv_freq())
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x_BTnH, cos_BTH, sin_BTH):
    """Rotate q or k ([B, T, heads, H]); halves layout, so HF weights need no permutation."""
    x = x_BTnH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
    return out.astype(x_BTnH.dtype)


def attention(q_BTNH, blocks, config: ModelConfig):
    """Grouped-query attention of T queries over one or more key/value blocks sharing one softmax.

    blocks: (k_BKSH, v_BKSH, allowed_BTS) triples, e.g. the cache slots before this call and this
    call's own keys: attending to them as two blocks reads the cache without copying it to append the
    new tokens. Scores and softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K, G = config.num_key_value_heads, config.num_groups
    q_BKGTH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4) * jnp.asarray(H**-0.5, q_BTNH.dtype)
    scores = [
        jnp.where(
            allowed_BTS[:, None, None],
            jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH, preferred_element_type=jnp.float32),
            _MASKED,
        )
        for k_BKSH, _, allowed_BTS in blocks
    ]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q_BTNH.dtype)
    out_BKGTH, start = 0, 0
    for _, v_BKSH, _ in blocks:
        S = v_BKSH.shape[2]
        out_BKGTH = out_BKGTH + jnp.einsum("BKGTS,BKSH->BKGTH", probs[..., start : start + S], v_BKSH)
        start += S
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _qkv(x_BTD, w, cos_sin, config: ModelConfig):
    """A block's normed input projected to rotated q [B, T, N, H] and k, v [B, T, K, H]."""
    h = rms_norm(x_BTD, w["attn_norm"], config.rms_norm_eps)
    q = jnp.einsum("BTD,DNH->BTNH", h, w["wq"])
    k = jnp.einsum("BTD,DKH->BTKH", h, w["wk"])
    v = jnp.einsum("BTD,DKH->BTKH", h, w["wv"])
    if config.attention_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    cos, sin = cos_sin
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _block_rest(x_BTD, attn_BTNH, w, config: ModelConfig):
    """The rest of a block after attention: output projection, residual, MLP, residual."""
    B, T, N, H = attn_BTNH.shape
    # As one [N*H] contraction: with "BTNH,NHD" XLA:CPU copied wo to [H, N, D] at every call.
    x_BTD = x_BTD + jnp.einsum("BTE,ED->BTD", attn_BTNH.reshape(B, T, N * H), w["wo"].reshape(N * H, -1))
    h = rms_norm(x_BTD, w["mlp_norm"], config.rms_norm_eps)
    gate = jax.nn.silu(jnp.einsum("BTD,DF->BTF", h, w["w_gate"]))
    up = jnp.einsum("BTD,DF->BTF", h, w["w_up"])
    return x_BTD + jnp.einsum("BTF,FD->BTD", gate * up, w["w_down"])


def _cast(tree, config: ModelConfig):
    return jax.tree.map(lambda a: a.astype(config.dtype), tree)


def _layer(x_BTD, lp, old, cos_sin, new_allowed_BTT, config: ModelConfig):
    """One decoder block. `old` is this layer's cache (k, v [B, K, S, H], allowed [B, T, S]) or None;
    returns the new hidden states and this call's keys and values [B, T, K, H] (for the cache)."""
    w = _cast(lp, config)
    q, k, v = _qkv(x_BTD, w, cos_sin, config)
    blocks = [(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), new_allowed_BTT)]
    if old is not None:
        k_cache, v_cache, allowed_BTS = old
        blocks.insert(0, (*_cast((k_cache, v_cache), config), allowed_BTS))
    return _block_rest(x_BTD, attention(q, blocks, config), w, config), (k, v)


def is_unstacked(params: Params) -> bool:
    """Whether `params["layers"]` is a list of per-layer dicts (`unstack_layers`), not stacked arrays."""
    return isinstance(params["layers"], (list, tuple))


def unstack_layers(params: Params) -> Params:
    """The same params with `layers` as a list of per-layer weight dicts (a copy of the layer
    weights), which `hidden_states` runs as an unrolled loop instead of a scan."""
    layers = params["layers"]
    L = jax.tree.leaves(layers)[0].shape[0]
    return dict(params, layers=[jax.tree.map(lambda a: a[i], layers) for i in range(L)])


def _unrolled_layers(layers, x_BTD, cos_sin, new_allowed_BTT, cache, config: ModelConfig):
    """The layer loop over unstacked weights. With a non-empty cache (per-layer lists), each layer
    first writes this call's keys/values into its cache slots (in place when the cache is donated),
    then attends over the whole cache: reading a buffer after updating it needs no copy, whereas
    attending to the old cache and then updating it made XLA copy every layer's cache."""
    ks, vs = [], []
    if cache is not None:
        index, (B, T) = cache["index"], new_allowed_BTT.shape[:2]
        empty = isinstance(index, int) and index == 0
        S = cache["k"][0].shape[2]
        old_BS = cache["valid_BS"] & (jnp.arange(S) < index)
        new_BTS = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((B, T, S), bool), new_allowed_BTT, index, axis=2)
        allowed_BTS = old_BS[:, None, :] | new_BTS
    for i, lp in enumerate(layers):
        w = _cast(lp, config)
        q, k, v = _qkv(x_BTD, w, cos_sin, config)
        k_BKTH, v_BKTH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if cache is not None:
            ks.append(jax.lax.dynamic_update_slice_in_dim(cache["k"][i], k_BKTH.astype(cache["k"][i].dtype), index, 2))
            vs.append(jax.lax.dynamic_update_slice_in_dim(cache["v"][i], v_BKTH.astype(cache["v"][i].dtype), index, 2))
        if cache is None or empty:  # a fresh cache holds nothing but this call's tokens: attend to them
            blocks = [(k_BKTH, v_BKTH, new_allowed_BTT)]
        else:
            blocks = [(*_cast((ks[-1], vs[-1]), config), allowed_BTS)]
        x_BTD = _block_rest(x_BTD, attention(q, blocks, config), w, config)
        x_BTD = constrain(x_BTD, ("batch", "seq", "act_embed"))
    return x_BTD, (ks, vs)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def hidden_states(
    params: Params,
    tokens_BT,
    config: ModelConfig,
    *,
    positions_BT=None,
    attention_mask_BT=None,
    segments_BT=None,
    cache: Cache | None = None,
    remat: str = "none",
):
    """Final-norm hidden states [B, T, D] (compute dtype) and the updated cache (None without one).

    `attention_mask_BT` marks real tokens (1) and padding (0); positions default to the count of real
    tokens before each one, so left padding does not shift positions. With a cache, positions must
    continue from the tokens already cached (the sampler passes them).

    `segments_BT` packs several sequences that share a prefix into one row (lidr_jax.train.pairs.pair_batch:
    a prompt, then its chosen and its rejected answer): segment 0 is the shared prefix, seen by every
    later token; a token of segment s > 0 sees only the prefix and its own segment. Positions must
    then be given (each segment continues from the prefix's end).
    """
    B, T = tokens_BT.shape
    mask_BT = jnp.ones((B, T), bool) if attention_mask_BT is None else attention_mask_BT.astype(bool)
    if positions_BT is None:
        if segments_BT is not None:
            raise ValueError("packed segments need explicit positions (each segment continues the prefix)")
        positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
    # New token i may see new token j <= i if j is real (cached slots: see the layer loops).
    new_allowed_BTT = mask_BT[:, None, :] & jnp.tril(jnp.ones((T, T), bool))[None]
    if segments_BT is not None:
        if cache is not None:
            raise ValueError("packed segments are for training and scoring passes, not for a KV cache")
        seg_i, seg_j = segments_BT[:, :, None], segments_BT[:, None, :]
        new_allowed_BTT &= (seg_j == 0) | (seg_j == seg_i)
    dt = jnp.dtype(config.dtype)
    x_BTD = constrain(params["embed"].astype(dt)[tokens_BT], ("batch", "seq", "act_embed"))
    cos_sin = rope_tables(positions_BT, config)
    unstacked = is_unstacked(params)
    if cache is not None and unstacked != isinstance(cache["k"], list):
        raise ValueError("the cache layout must match the params: init_cache(..., per_layer=True) for unstacked layers")
    if unstacked:
        if remat != "none":
            raise ValueError("remat applies to stacked layers (training); unstacked layers are for generation")
        x_BTD, (k_new, v_new) = _unrolled_layers(params["layers"], x_BTD, cos_sin, new_allowed_BTT, cache, config)
    else:
        x_BTD, (k_new, v_new) = _scanned_layers(params["layers"], x_BTD, cos_sin, new_allowed_BTT, cache, config, remat)
    h_BTD = rms_norm(x_BTD, params["final_norm"], config.rms_norm_eps)
    if cache is None:
        return h_BTD, None
    index = cache["index"]
    new_cache = {
        "k": k_new,
        "v": v_new,
        "valid_BS": jax.lax.dynamic_update_slice_in_dim(cache["valid_BS"], mask_BT, index, axis=1),
        "index": jnp.asarray(index + T, jnp.int32),
    }
    return h_BTD, new_cache


def _scanned_layers(layers, x_BTD, cos_sin, new_allowed_BTT, cache, config: ModelConfig, remat: str):
    """The layer loop as a `lax.scan` over stacked weights; returns the hidden states and the updated
    cache's k, v (None, None without a cache).

    The cache enters the scan as per-layer slices (xs, read only); each layer returns only this call's
    keys/values (ys, [L, B, T, K, H]), written into the cache once after the scan, in place when the
    cache is donated. Carrying the whole [L, B, K, S, H] buffer through the scan and updating a layer
    of it made XLA copy it every layer (1.5 s per SmolLM2 decode step at B=32, S=384) and made
    backward save it once per layer."""
    if cache is not None:
        index, (B, T) = cache["index"], new_allowed_BTT.shape[:2]
        empty = isinstance(index, int) and index == 0  # a fresh cache: nothing cached to attend to
        S = cache["k"].shape[3]
        # Cached slot s is visible if it holds a token and s < index (slots from `index` on are this
        # call's own, attended through the new block).
        allowed_BTS = jnp.broadcast_to((cache["valid_BS"] & (jnp.arange(S) < index))[:, None, :], (B, T, S))

    def body(x, xs):
        if cache is None:
            lp, old = xs, None
        else:
            lp, old = xs[0], (None if empty else (xs[1], xs[2], allowed_BTS))
        x, kv_new = _layer(x, lp, old, cos_sin, new_allowed_BTT, config)
        x = constrain(x, ("batch", "seq", "act_embed"))
        return x, (kv_new if cache is not None else None)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    xs = (layers, cache["k"], cache["v"]) if cache is not None else layers
    x_BTD, kv_new = jax.lax.scan(body, x_BTD, xs)
    if cache is None:
        return x_BTD, (None, None)
    k_LBKTH, v_LBKTH = (a.transpose(0, 1, 3, 2, 4).astype(cache["k"].dtype) for a in kv_new)
    k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_LBKTH, index, axis=3)
    v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_LBKTH, index, axis=3)
    return x_BTD, (k, v)


def unembed(params: Params, h_BTD, config: ModelConfig):
    """Logits [..., V] in float32 from hidden states (accumulated in float32 whatever the dtype)."""
    dt = jnp.dtype(config.dtype)
    if config.tie_word_embeddings:
        return jnp.einsum("...D,VD->...V", h_BTD, params["embed"].astype(dt), preferred_element_type=jnp.float32)
    return jnp.einsum("...D,DV->...V", h_BTD, params["lm_head"].astype(dt), preferred_element_type=jnp.float32)


def forward(
    params: Params,
    tokens_BT,
    config: ModelConfig,
    *,
    positions_BT=None,
    attention_mask_BT=None,
    segments_BT=None,
    cache: Cache | None = None,
    remat: str = "none",
):
    """Logits [B, T, V] in float32. With a `cache`, returns `(logits, updated_cache)`."""
    h_BTD, new_cache = hidden_states(
        params,
        tokens_BT,
        config,
        positions_BT=positions_BT,
        attention_mask_BT=attention_mask_BT,
        segments_BT=segments_BT,
        cache=cache,
        remat=remat,
    )
    logits = unembed(params, h_BTD, config)
    return logits if cache is None else (logits, new_cache)
