"""The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2, SmolLM2) as pure functions.

Shape key, used in every name and einsum string of the package (`x_BTD`, `wq_DNH`):
    B batch        T query positions   S key/value positions (cache slots)
    D model width  F mlp width         V vocabulary          L layers
    N query heads  K key/value heads   G = N // K (GQA group) H head dim

Parameters are a plain nested dict of arrays; every weight is declared once in `param_specs` (shape,
logical axes, initializer) and lidr_jax.parallel.sharding maps the logical axes to mesh axes. Layer
weights are stacked on a leading layer axis.

`block` is one decoder layer, x + attn(norm(x)) then x + mlp(norm(x)). Two loops call it:
- without a KV cache (training, scoring), a `lax.scan` over the stacked layers: compile time flat in
  depth, with optional activation recomputation (`remat`);
- with a KV cache (generation), an unrolled loop over the layers. Each layer's weights are either a
  slice of the stacked arrays or, when the caller passes `layers` (`unstack_layers`, a copy), a
  per-layer dict: on XLA:CPU slicing a stacked weight copies it at every decode step, because a
  slice is not fused into a library GEMM (lidr_jax.sampling chooses the layout; BENCHMARKS.md).

The cache protocol (one, for every layer; `KVCache`): a list of L per-layer buffers k [B, K, H, S] (keys
transposed) and v [B, K, S, H], and `end_B`, the slots each row has filled. A call writes its T new
keys/values of row b at slots end_B[b] .. end_B[b] + T - 1 (in place when the cache is donated), then
attends over the buffer: query t of row b sees slot s iff s <= end_B[b] + t. A row's real tokens must
therefore come first (right padding); `end_B` then grows by the row's real tokens, so the next call
overwrites its padding. Writing before reading matters on XLA:CPU: attending to the old buffer and then
updating it made XLA copy every layer's cache at every step. Keys are stored transposed because the
decode step's score dot q [G, H] x k [H, S] then runs as a plain GEMM on XLA:CPU; over k [S, H] it ran
at half the speed (BENCHMARKS.md, "Decode step profile"). A `fresh` cache (static: part of the
pytree's structure, so a jitted function compiles apart for it) has no row filled: a call then writes
from slot 0 and attends to its own tokens only (XLA would otherwise constant-fold the all-masked scores:
16 s of compile time for a SmolLM2 prefill at B=32).

`forward` gives logits; `forward_cached` gives logits and the updated cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lidr_jax.model.attention import Attention
from lidr_jax.model.config import ModelConfig
from lidr_jax.model.segments import MASKED, segment_sees
from lidr_jax.parallel.sharding import constrain

Params = dict[str, Any]

_ACT = ("batch", "seq", "act_embed")
_K = ("batch", "kv_heads", "head_dim", "seq")  # a layer's key buffer (keys transposed)
_V = ("batch", "kv_heads", "seq", "head_dim")  # a layer's value buffer; both sharded only under an active mesh


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: its shape, a logical axis name per dimension, and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"  # "normal" (std 0.02, as transformers initialises Llama), "ones", "zeros"


def param_specs(config: ModelConfig) -> Params:
    """The params pytree, with a `ParamSpec` at every leaf (what lidr_jax.parallel.sharding is given)."""
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
    params = {"embed": ParamSpec((V, D), ("vocab", "embed")), "layers": layers}
    params["final_norm"] = ParamSpec((D,), ("norm",), "ones")
    if not c.tie_word_embeddings:
        params["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return params


def init_params(config: ModelConfig, key: jax.Array) -> Params:
    """Random parameters (std 0.02 normal, norms one, biases zero) in `config.param_dtype`."""
    leaves, treedef = jax.tree.flatten(param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))
    dtype = jnp.dtype(config.param_dtype)

    def make(spec: ParamSpec, k):
        if spec.init in ("ones", "zeros"):
            return (jnp.ones if spec.init == "ones" else jnp.zeros)(spec.shape, dtype)
        return (0.02 * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, jax.random.split(key, len(leaves)))])


def abstract_params(config: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` for every parameter, with no allocation."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def count_params(params_or_abstract: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_or_abstract))


def unstack_layers(params: Params) -> list[Params]:
    """The layer weights as a list of L per-layer dicts, for `hidden_states(..., layers=)`: a copy when
    called outside jit, slices of the stacked arrays inside."""
    stacked = params["layers"]
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(jax.tree.leaves(stacked)[0].shape[0])]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "end_B"], meta_fields=["fresh"])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A KV cache (the protocol of the module docstring), a pytree: L per-layer key buffers k [B, K, H, S]
    (keys transposed), value buffers v [B, K, S, H], and end_B int32 [B], the slots each row has filled.
    `fresh` (static) marks a cache no row has written to yet (end_B all 0): a call writes from slot 0
    and attends to its own tokens only. Every call returns a cache that is not fresh."""

    k: list
    v: list
    end_B: Any
    fresh: bool = False

    @property
    def slots(self) -> int:
        """S, the cache slots per row."""
        return self.v[0].shape[2]

    def with_lengths(self, end_B) -> KVCache:
        """The same buffers with rows filled to `end_B` (a cache in use, not fresh)."""
        return KVCache(self.k, self.v, end_B, fresh=False)

    def replace(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
    """An empty, fresh KV cache of `max_len` slots per row (the protocol of the module docstring).

    Heads before slots: attention contracts with (B, K) as batch dimensions, so these layouts feed the
    matmuls without a transpose of the cache: scores over k [H, S], outputs over v [S, H]."""
    B, K, S, H, dtype = batch, config.num_key_value_heads, max_len, config.head_dim, jnp.dtype(dtype or config.dtype)

    def empty(shape, axes):
        return [constrain(jnp.zeros(shape, dtype), axes) for _ in range(config.num_hidden_layers)]

    return KVCache(empty((B, K, H, S), _K), empty((B, K, S, H), _V), jnp.zeros((B,), jnp.int32), fresh=True)


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
    return (x * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]).astype(x_BTnH.dtype)


def attention(q_BTNH, k, v_BKSH, allowed_BTS, config: ModelConfig, keys: str = "BKSH"):
    """Grouped-query attention of T queries over S key/value slots; scores and softmax in float32.
    `keys`: the layout of `k`, "BKSH" or "BKHS" (a KV cache's transposed keys)."""
    B, T, N, H = q_BTNH.shape
    K, G = config.num_key_value_heads, config.num_groups
    q_BKGTH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4) * jnp.asarray(H**-0.5, q_BTNH.dtype)
    scores = jnp.einsum(f"BKGTH,{keys}->BKGTS", q_BKGTH, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(allowed_BTS[:, None, None], scores, MASKED), axis=-1)
    out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs.astype(q_BTNH.dtype), v_BKSH)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _write(buf, new, end_B, axis: int):
    """Row b's new entries into slots end_B[b].. of the slot `axis` (None: every row from slot 0)."""
    new = new.astype(buf.dtype)
    if end_B is None:
        return jax.lax.dynamic_update_slice_in_dim(buf, new, 0, axis=axis)
    return jax.vmap(lambda b, n, e: jax.lax.dynamic_update_slice_in_dim(b, n, e, axis=axis - 1))(buf, new, end_B)


@dataclasses.dataclass(frozen=True)
class AttentionView:
    """Which key slots each query of a call sees, worked out once per call for every layer (`_view`)."""

    allowed_BTS: Any  # bool [B, T, S]: query t of row b sees key slot s
    end_B: Any  # int32 [B]: where a cache's rows write their new keys (None: from slot 0, or no cache)
    read_cache: bool  # attend to the cache's first kv_len slots (else to the call's own T keys)
    kv_len: int
    impl: Attention  # what the layers run (masked einsums: `attention` below)
    segments_BT: Any  # packed segments (lidr_jax.model.segments) or None
    mask_BT: Any  # bool [B, T]: real tokens


def self_attention(h_BTD, w, rope, kv, view: AttentionView, config: ModelConfig):
    """Attention of a normed input: the output [B, T, D] and the layer's updated cache buffers (k, v)
    (None without a cache). With `view.read_cache` the new keys are written first and the first kv_len
    slots attended."""
    end_B, read_cache, kv_len, impl = view.end_B, view.read_cache, view.kv_len, view.impl
    allowed_BTS, segments_BT, mask_BT = view.allowed_BTS, view.segments_BT, view.mask_BT
    q = jnp.einsum("BTD,DNH->BTNH", h_BTD, w["wq"])
    k = jnp.einsum("BTD,DKH->BTKH", h_BTD, w["wk"])
    v = jnp.einsum("BTD,DKH->BTKH", h_BTD, w["wv"])
    if config.attention_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    # named for remat policies (REMAT_POLICIES["names"]); a name is an identity outside jax.checkpoint
    q, k = checkpoint_name(apply_rope(q, *rope), "attn_q"), checkpoint_name(apply_rope(k, *rope), "attn_k")
    v = checkpoint_name(v, "attn_v")
    keys, v_BKSH = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # keys [B, K, T, H] here
    if kv is not None:
        kv = (_write(kv[0], k.transpose(0, 2, 3, 1), end_B, axis=3), _write(kv[1], v_BKSH, end_B, axis=2))
    layout = "BKSH"
    if read_cache:  # a slice short of the whole buffer is a copy on XLA:CPU (the engine windows per chunk)
        keys, v_BKSH, layout = kv[0][..., :kv_len], kv[1][:, :, :kv_len], "BKHS"
        keys, v_BKSH = keys.astype(h_BTD.dtype), v_BKSH.astype(h_BTD.dtype)
    if impl.masked_einsums:
        out_BTNH = attention(q, keys, v_BKSH, allowed_BTS, config, keys=layout)
    else:
        k_BKSH = keys if layout == "BKSH" else keys.transpose(0, 1, 3, 2)
        out_BTNH = impl(q, k_BKSH, v_BKSH, allowed_BTS, segments_BT, mask_BT)
    out_BTNH = checkpoint_name(out_BTNH, "attn_out")
    B, T, N, H = out_BTNH.shape
    # As one [N*H] contraction: with "BTNH,NHD" XLA:CPU copied wo to [H, N, D] at every call.
    return jnp.einsum("BTE,ED->BTD", out_BTNH.reshape(B, T, N * H), w["wo"].reshape(N * H, -1)), kv


def mlp(h_BTD, w):
    """SwiGLU: down(silu(gate(h)) * up(h))."""
    gate_BTF = jax.nn.silu(checkpoint_name(jnp.einsum("BTD,DF->BTF", h_BTD, w["w_gate"]), "mlp_gate"))
    up_BTF = checkpoint_name(jnp.einsum("BTD,DF->BTF", h_BTD, w["w_up"]), "mlp_up")
    return jnp.einsum("BTF,FD->BTD", gate_BTF * up_BTF, w["w_down"])


def block(x_BTD, w, rope, kv, view, config: ModelConfig):
    """One decoder layer over its weights `w` (cast to the compute dtype here) and its cache buffers
    `kv` (or None): returns the new hidden states and the updated buffers."""
    w = jax.tree.map(lambda a: a.astype(config.dtype), w)
    eps = config.rms_norm_eps
    attn_BTD, kv = self_attention(rms_norm(x_BTD, w["attn_norm"], eps), w, rope, kv, view, config)
    x_BTD = checkpoint_name(x_BTD + attn_BTD, "resid_mid")
    x_BTD = x_BTD + mlp(rms_norm(x_BTD, w["mlp_norm"], eps), w)
    return constrain(x_BTD, _ACT), kv


def _view(mask_BT, segments_BT, cache: KVCache | None, kv_len: int, impl: Attention) -> AttentionView:
    """Which key slots each query sees, worked out once per call for every layer (see `self_attention`)."""
    B, T = mask_BT.shape
    # Without a cache (or with a fresh one) the keys are this call's T tokens: token i sees real token
    # j <= i (within a packed row, the shared prefix and its own segment only).
    allowed_BTT = mask_BT[:, None, :] & jnp.tril(jnp.ones((T, T), bool))[None]
    if segments_BT is not None:  # packed rows (lidr_jax.model.segments)
        allowed_BTT &= segment_sees(segments_BT[:, :, None], segments_BT[:, None, :])
    if cache is None or cache.fresh:
        return AttentionView(allowed_BTT, None, False, T, impl, segments_BT, mask_BT)
    last_BT = cache.end_B[:, None] + jnp.arange(T)[None]  # the slot of each query's own token
    allowed_BTS = jnp.arange(kv_len)[None, None, :] <= last_BT[:, :, None]
    return AttentionView(allowed_BTS, cache.end_B, True, kv_len, impl, segments_BT, mask_BT)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # between none and dots: keep q, k (after rotary), v, the attention output, the residual stream
    # between attention and MLP and the MLP's two input products; the backward pass recomputes the norms
    # and the attention's scores and probabilities, the largest activations ([T, keys] per head)
    "names": jax.checkpoint_policies.save_only_these_names(
        "attn_q", "attn_k", "attn_v", "attn_out", "resid_mid", "mlp_gate", "mlp_up"
    ),
}


def hidden_states(
    params: Params,
    tokens_BT,
    config: ModelConfig,
    *,
    positions_BT=None,
    attention_mask_BT=None,
    segments_BT=None,
    cache: KVCache | None = None,
    layers: list[Params] | None = None,
    kv_len: int | None = None,
    remat: str = "none",
    attention: Attention | str = "xla",
):
    """Final-norm hidden states [B, T, D] (compute dtype) and the updated cache (None without one).

    `attention_mask_BT` marks real tokens (1) and padding (0). Positions default to the count of real
    tokens before each one (plus `end_B` with a cache), so left padding (no cache) and right padding
    (a cache) do not shift positions.

    `segments_BT` packs sequences that share a prefix into one row (lidr_jax.model.scoring.answer_batch:
    a prompt, then its chosen and its rejected answer), and several such groups into one row
    (lidr_jax.train.packing), by the rule of lidr_jax.model.segments. Positions must then be given
    (each segment continues from the prefix's end). Not with a cache.

    With a `cache` (module docstring) the layers run unrolled, on `layers` when given (per-layer
    dicts, `unstack_layers`) or else on slices of `params["layers"]`; `kv_len` (static, default all
    slots) limits attention to the first kv_len slots, which must hold every row's tokens.

    `attention`: a lidr_jax.model.attention.Attention, or the name of one `resolve` gave (xla, cudnn, splash).
    """
    B, T = tokens_BT.shape
    mask_BT = jnp.ones((B, T), bool) if attention_mask_BT is None else attention_mask_BT.astype(bool)
    if segments_BT is not None and (positions_BT is None or cache is not None):
        raise ValueError("packed segments need explicit positions and no KV cache (they are for scoring passes)")
    if positions_BT is None:
        start_B1 = 0 if cache is None or cache.fresh else cache.end_B[:, None]
        positions_BT = start_B1 + jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
    if cache is not None and remat != "none":
        raise ValueError("remat applies to the layer scan of training passes, not to cached generation")
    x_BTD = constrain(params["embed"].astype(config.dtype)[tokens_BT], _ACT)
    rope = rope_tables(positions_BT, config)
    kv_len = kv_len or (cache.slots if cache is not None else T)
    view = _view(mask_BT, segments_BT, cache, kv_len, Attention.of(attention))
    if cache is None:

        def body(x_BTD, w):
            return block(x_BTD, w, rope, None, view, config)[0], None

        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        x_BTD, _ = jax.lax.scan(body, x_BTD, params["layers"], unroll=not config.scan_layers)
        new_cache = None
    else:
        ks, vs = [], []
        for w, k, v in zip(layers or unstack_layers(params), cache.k, cache.v, strict=True):
            x_BTD, (k, v) = block(x_BTD, w, rope, (k, v), view, config)
            ks.append(k)
            vs.append(v)
        end_B = (cache.end_B + jnp.sum(mask_BT, axis=1)).astype(jnp.int32)
        new_cache = KVCache(ks, vs, end_B, fresh=False)
    return rms_norm(x_BTD, params["final_norm"], config.rms_norm_eps), new_cache


def unembed(params: Params, h_BTD, config: ModelConfig):
    """Logits [..., V] in float32 from hidden states (accumulated in float32 whatever the dtype)."""
    dt = jnp.dtype(config.dtype)
    if config.tie_word_embeddings:
        return jnp.einsum("...D,VD->...V", h_BTD, params["embed"].astype(dt), preferred_element_type=jnp.float32)
    return jnp.einsum("...D,DV->...V", h_BTD, params["lm_head"].astype(dt), preferred_element_type=jnp.float32)


def forward(params: Params, tokens_BT, config: ModelConfig, **kwargs):
    """Logits [B, T, V] in float32 (no cache: `forward_cached`). Keyword arguments as `hidden_states`
    (positions_BT, attention_mask_BT, segments_BT, remat, attention)."""
    if "cache" in kwargs:
        raise TypeError("forward takes no cache; forward_cached returns the logits and the updated cache")
    h_BTD, _ = hidden_states(params, tokens_BT, config, **kwargs)
    return unembed(params, h_BTD, config)


def forward_cached(params: Params, tokens_BT, config: ModelConfig, cache: KVCache, **kwargs):
    """(logits [B, T, V] float32, the updated cache) of a call over a KV cache (module docstring). Keyword
    arguments as `hidden_states` (positions_BT, attention_mask_BT, layers, kv_len, attention)."""
    h_BTD, new_cache = hidden_states(params, tokens_BT, config, cache=cache, **kwargs)
    return unembed(params, h_BTD, config), new_cache
