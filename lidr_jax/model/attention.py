"""Attention implementations for the decoder (`dpo.compute.attention: auto | xla | cudnn | splash`).

- xla: lidr_jax.model.llama.attention, einsums with every score materialised ([B, K, G, T, S] float32);
  any mask: causal, packed segments with a shared prompt, a KV cache. Runs everywhere.
- cudnn: cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA
  GPUs, bfloat16/float16 compute only. The mask (which slots each query sees: causal, segments, cache)
  is handed over as a [B, 1, T, S] boolean mask, which JAX turns into an additive bias: the scores and
  probabilities are never materialised, the bias is (one per row, not per head).
- splash: Pallas splash attention on TPU (causal mask and segment ids). Segment ids say "same id
  only", which cannot express a prompt seen by two answers that must not see each other, so splash
  needs each segment group to hold one answer: packed rows with `dpo.share_prompt: false` (the prompt
  written once per answer, lidr_jax.train.packing). It has no KV-cache path here.

`resolve` turns a setting into the name of the implementation a pass uses: `auto` picks cudnn on GPU
(bfloat16 compute), splash on TPU (rows without a shared prompt, no cache), else xla, and says once (a
warning) when it falls back from a fused kernel; an explicit choice that cannot run raises with the
reason. `Attention` is what a forward pass runs: such a name, or a caller's own function (packed rows'
block attention).

Two spellings exist for tests only, so the code of the fused paths runs on CPU: `jax_nn` (the cudnn path
with jax.nn.dot_product_attention's own XLA backend) and `splash_interpret` (splash in Pallas's
interpret mode).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec

from lidr_jax.model.segments import segment_group
from lidr_jax.parallel.sharding import active, spec_for

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_TEST_ONLY = ("jax_nn", "splash_interpret")
_said: set[str] = set()
# The platform programs are compiled for, when it is not this process's backend (lidr_jax.pipeline.plan
# compiles TPU programs on a CPU): `resolve` chooses for it.
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("lidr_target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Resolve attention for `platform` ("tpu", "gpu", "cpu") inside the block, whatever runs it."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def _fallback_reason(impl: str, platform: str, dtype: str, shared_prompt: bool, cache: bool) -> str | None:
    if impl == "cudnn":
        if platform != "gpu":
            return f"cuDNN attention needs an NVIDIA GPU (backend: {platform})"
        if dtype not in ("bfloat16", "float16"):
            return f"cuDNN flash attention runs in bfloat16/float16, not {dtype} (set compute_dtype: bfloat16)"
    if impl == "splash":
        if platform != "tpu":
            return f"splash attention is a TPU kernel (backend: {platform})"
        if cache:
            return "splash attention has no KV-cache path here"
        if shared_prompt:
            return "splash segment ids cannot express a prompt shared by two answers (set dpo.share_prompt: false)"
    return None


def resolve(
    setting: str,
    *,
    dtype: str = "float32",
    shared_prompt: bool = False,
    cache: bool = False,
    platform: str | None = None,
) -> str:
    """The implementation a pass uses for `setting` (module docstring). `shared_prompt`: the rows hold
    a prompt seen by two answers (pair_batch, or packing with share_prompt); `cache`: generation."""
    if setting in _TEST_ONLY:
        return setting
    if setting not in IMPLEMENTATIONS:
        raise ValueError(f"attention={setting!r}: choose one of {IMPLEMENTATIONS}")
    platform = platform or _TARGET.get() or jax.default_backend()
    platform = "gpu" if platform in ("cuda", "rocm", "gpu") else platform
    if setting == "xla":
        return "xla"
    want = setting if setting != "auto" else {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
    reason = None if want == "xla" else _fallback_reason(want, platform, dtype, shared_prompt, cache)
    if reason is None:
        return want
    if setting != "auto":
        raise ValueError(f"attention={setting}: {reason}")
    message = f"attention auto: using xla, not {want}: {reason}"
    if message not in _said:
        _said.add(message)
        warnings.warn(message, stacklevel=2)
    return "xla"


def dot_product_attention(q_BTNH, k_BKSH, v_BKSH, allowed_BTS, *, implementation: str = "cudnn"):
    """Grouped-query attention through `jax.nn.dot_product_attention` (cuDNN flash on GPU) with any
    boolean mask of allowed slots. Queries that see no slot (padding) come out as garbage, never NaN."""
    k_BSKH, v_BSKH = k_BKSH.transpose(0, 2, 1, 3), v_BKSH.transpose(0, 2, 1, 3)
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=allowed_BTS[:, None], implementation=implementation
    ).astype(q_BTNH.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, T: int, S: int, interpret: bool):
    mask = sm.MultiHeadMask([sm.CausalMask((T, S))] * num_heads)
    block = next((b for b in (512, 256, 128) if T % b == 0), T)  # the kernel's blocks must tile T
    names = ("q", "kv", "kv_compute", "q_dkv", "kv_dkv", "kv_dkv_compute", "q_dq", "kv_dq")
    sizes = sk.BlockSizes(**{f"block_{name}": block for name in names})
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def splash_attention(q_BTNH, k_BKSH, v_BKSH, segment_ids_BT, *, interpret: bool = False):
    """Causal grouped-query attention over the call's own T tokens with Pallas splash attention: token
    i sees token j <= i of the same segment id (padding: an id of its own). T a multiple of 128 on TPU.

    A Mosaic kernel cannot be partitioned by the compiler, so under an active mesh (lidr_jax.parallel.
    sharding.use_mesh) the kernel runs per shard inside `jax.shard_map`: rows split as the "batch" rule
    says (data, fsdp), heads as "q_heads"/"kv_heads" say (tensor) where both head counts divide, each
    shard the whole of its rows' T tokens (attention never crosses rows)."""
    B, T, N, H = q_BTNH.shape
    if k_BKSH.shape[2] != T:
        raise ValueError("splash attention runs over the call's own tokens (no KV cache)")
    q_BNTH = (q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype)).transpose(0, 2, 1, 3)
    seg = segment_ids_BT.astype(jnp.int32)

    def local(q_BNTH, k_BKSH, v_BKSH, seg_BT):  # one shard's rows and heads (the whole array without a mesh)
        kernel = _splash_kernel(q_BNTH.shape[1], T, T, interpret)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s)))(
            q_BNTH, k_BKSH, v_BKSH, seg_BT
        )

    ctx = active()
    if ctx is None or ctx.mesh.size == 1:
        out_BNTH = local(q_BNTH, k_BKSH, v_BKSH, seg)
    else:
        rows = spec_for(("batch",), ctx.rules, ctx.mesh, (B,))[0]
        heads = spec_for(("q_heads",), ctx.rules, ctx.mesh, (N,))[0]
        if heads != spec_for(("kv_heads",), ctx.rules, ctx.mesh, (k_BKSH.shape[1],))[0]:
            heads = None  # a query head and its key/value head must land on the same shard
        heads_spec, rows_spec = PartitionSpec(rows, heads, None, None), PartitionSpec(rows, None)
        out_BNTH = jax.shard_map(
            local,
            mesh=ctx.mesh,
            in_specs=(heads_spec, heads_spec, heads_spec, rows_spec),
            out_specs=heads_spec,
            check_vma=False,  # a Pallas call carries no varying-axis types
        )(q_BNTH, k_BKSH, v_BKSH, seg)
    return out_BNTH.transpose(0, 2, 1, 3).astype(q_BTNH.dtype)


def splash_segment_ids(segments_BT, mask_BT):
    """Splash's segment id of each token: its group (segments s // 3: a prompt and one answer), and one
    id for all padding."""
    return jnp.where(mask_BT, segment_group(segments_BT), -1)


@dataclasses.dataclass(frozen=True)
class Attention:
    """The attention every layer of a forward pass runs, as one type: `name`, an implementation
    `resolve` gives (xla, cudnn, splash, or a test-only spelling), or `own`, a caller's function of
    q [B, T, N, H], k [B, K, S, H] and v [B, K, S, H] giving [B, T, N, H] (packed rows' block attention,
    lidr_jax.train.packing), run instead of any name's. Hashable: forward passes take it as a static."""

    name: str = "xla"
    own: Callable | None = None

    @classmethod
    def of(cls, attention: Attention | str) -> Attention:
        """`attention` as an Attention (a resolved name as a string is accepted at the API's edge)."""
        return attention if isinstance(attention, Attention) else cls(attention)

    @property
    def masked_einsums(self) -> bool:
        """Whether this is lidr_jax.model.llama.attention: einsums with every score materialised, any mask."""
        return self.own is None and self.name == "xla"

    def __call__(self, q_BTNH, k_BKSH, v_BKSH, allowed_BTS, segments_BT, mask_BT):
        """The output [B, T, N, H] of a fused or own implementation: cudnn/jax_nn use `allowed_BTS`;
        splash uses the segment ids and the causal order instead (without segments: one per row)."""
        if self.own is not None:
            return self.own(q_BTNH, k_BKSH, v_BKSH)
        if self.name in ("cudnn", "jax_nn"):
            return dot_product_attention(
                q_BTNH, k_BKSH, v_BKSH, allowed_BTS, implementation="cudnn" if self.name == "cudnn" else "xla"
            )
        if self.name in ("splash", "splash_interpret"):
            seg = jnp.zeros(mask_BT.shape, jnp.int32) if segments_BT is None else segments_BT
            return splash_attention(
                q_BTNH, k_BKSH, v_BKSH, splash_segment_ids(seg, mask_BT), interpret=self.name == "splash_interpret"
            )
        raise ValueError(f"no fused attention {self.name!r}")
