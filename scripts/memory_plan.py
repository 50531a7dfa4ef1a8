"""Per-device memory plan for DPO training, computed from shapes (nothing is allocated or guessed).

    python scripts/memory_plan.py                      # Llama-3-8B on TPU v5e-8, v5e-16, 8 x H100
    python scripts/memory_plan.py --prompt 1024 --response 2048 --pairs-per-device 2

- Parameters, AdamW state and gradients: `jax.eval_shape` of lidr_jax.train.trainer.init_state on the
  abstract params, placed with lidr_jax.dist.sharding's rules on a (data, fsdp, tensor) mesh of virtual
  CPU devices; each leaf counts its shard shape (NamedSharding.shard_shape). float32 master weights
  and Adam moments, as lidr_jax.train keeps them. Gradients count twice: the accumulator carried
  by the micro-batch scan and one micro-batch's gradients.
- Activations: the residuals that `jax.vjp` saves for the backward pass of the DPO log-prob
  forward (jax's own `saved_residuals`, traced on abstract inputs) for `pairs-per-device` packed
  pair rows (prompt + chosen + rejected tokens, lidr_jax.train.pairs.pair_batch) in bfloat16 compute, per
  remat policy. Inputs (the weights) are not counted again.
  The trace is the unsharded program at the per-device batch, so a residual that is a whole
  bfloat16 weight copy (remat none) is counted whole: an upper bound under FSDP.
- Transient peaks, analytic from the einsum shapes and stated as such: one layer's weights
  all-gathered in bfloat16, and one log-softmax chunk's float32 logits [pairs, chunk, V] times 3
  (logits, log-softmax, their gradient).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from lidr_jax.dist.sharding import MeshConfig, make_mesh, state_shardings
from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import abstract_params, count_params, param_specs
from lidr_jax.model.logprobs import pair_logprobs
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.trainer import init_state, make_optimizer

GiB = 2**30
LLAMA3_8B = ModelConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    dtype="bfloat16",
)
TARGETS = [  # name, HBM per device (GiB), mesh sizes (data, fsdp, tensor)
    ("TPU v5e-8", 16.0, (1, 8, 1)),
    ("TPU v5e-16", 16.0, (1, 16, 1)),
    ("8 x H100 80GB", 80e9 / GiB, (1, 8, 1)),
]


def _from_jax_import_saved_residuals():
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

    return saved_residuals


def state_bytes_per_device(config: ModelConfig, mesh) -> dict[str, float]:
    """Bytes on the busiest device of params, AdamW moments and gradients (float32)."""
    optimizer = make_optimizer(DPOConfig(), 100)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params(config))
    shardings = state_shardings(state, param_specs(config), mesh)

    def per_device(tree, sh):
        return sum(
            int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sh))
        )

    params = per_device(state.params, shardings.params)
    opt = per_device(state.opt_state, shardings.opt_state)
    return {"params": params, "adamw": opt, "grads": 2 * params}


def activation_bytes(config: ModelConfig, pairs: int, seq: int, entries: int, remat: str, chunk: int) -> int:
    """Residuals saved for the backward pass (jax's saved_residuals), weights excluded, for `pairs`
    packed rows of `seq` tokens with `entries` scored answer tokens each."""
    saved_residuals = _from_jax_import_saved_residuals()
    rows = {
        k: jax.ShapeDtypeStruct((pairs, seq), jnp.bool_ if k == "attention_mask" else jnp.int32)
        for k in ("tokens", "positions", "segments", "attention_mask")
    }
    scored = {
        k: jax.ShapeDtypeStruct((pairs, entries), jnp.int32 if k in ("logit_index", "targets") else jnp.bool_)
        for k in ("logit_index", "targets", "chosen_mask", "rejected_mask")
    }
    batch = {**rows, **scored}
    f = lambda p, b: pair_logprobs(p, b, config, chunk=chunk, remat=remat)[0].sum()
    res = saved_residuals(f, abstract_params(config), batch)
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, src in res if "argument" not in src)


def transient_bytes(config: ModelConfig, pairs: int, chunk: int) -> tuple[int, int]:
    """Analytic: one layer's weights gathered in bfloat16; one logits chunk in float32, three times."""
    layer = count_params(abstract_params(config)["layers"]) // config.num_hidden_layers * 2
    logits = 3 * pairs * chunk * config.vocab_size * 4
    return layer, logits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens per pair (dpo.max_prompt_len)")
    ap.add_argument("--response", type=int, default=1024, help="tokens per answer (dpo.max_response_len)")
    ap.add_argument("--pairs-per-device", type=int, default=1, help="packed pair rows per device per micro-batch")
    ap.add_argument("--chunk", type=int, default=256, help="dpo.logprob_chunk")
    args = ap.parse_args(argv)
    config = LLAMA3_8B
    n = count_params(abstract_params(config))
    seq, entries = args.prompt + 2 * args.response, 2 * args.response  # one packed row per pair
    acts = {
        r: activation_bytes(config, args.pairs_per_device, seq, entries, r, args.chunk)
        for r in ("none", "dots", "full")
    }
    layer, logits = transient_bytes(config, args.pairs_per_device, args.chunk)
    print(f"Llama-3-8B ({n:,} parameters), DPO, float32 master weights and AdamW state, bfloat16 compute,")
    print(
        f"{args.pairs_per_device} packed pair row(s) of {seq} tokens ({args.prompt} prompt + 2 x {args.response} answer) "
        f"per device per micro-batch, log-prob chunk {args.chunk}."
    )
    print("GiB per device:\n")
    print(
        "| target | mesh (data, fsdp, tensor) | params f32 | AdamW mu+nu | grads (acc + micro) | transient (layer gather + logits chunk) "
        "| activations none / dots / full | total none / dots / full | HBM |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, hbm, shape in TARGETS:
        mesh = make_mesh(
            MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]), jax.devices()[: int(np.prod(shape))]
        )
        st = state_bytes_per_device(config, mesh)
        fixed = st["params"] + st["adamw"] + st["grads"] + layer + logits
        totals = [(fixed + acts[r]) / GiB for r in ("none", "dots", "full")]
        fits = " / ".join(f"{t:.1f}" + ("" if t <= hbm else " (no)") for t in totals)
        print(
            f"| {name} | {shape} | {st['params'] / GiB:.2f} | {st['adamw'] / GiB:.2f} | {st['grads'] / GiB:.2f} | "
            f"{(layer + logits) / GiB:.2f} | {' / '.join(f'{acts[r] / GiB:.2f}' for r in ('none', 'dots', 'full'))} | "
            f"{fits} | {hbm:.1f} |"
        )
    print("\n(no): exceeds the device's memory. XLA's buffer reuse can lower real peaks; fragmentation raises them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
