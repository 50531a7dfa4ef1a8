"""Per-device memory of DPO training, from shapes (nothing is allocated), and the fit check before training.

- Parameters and AdamW state: `jax.eval_shape` of lidr_jax.train.trainer.init_state on the abstract
  params, placed with lidr_jax.parallel.sharding's rules on an abstract (data, fsdp, tensor) mesh (no devices
  needed); each leaf counts its shard shape on the busiest device. float32 master weights and moments, as
  lidr_jax.train keeps them. Gradients count twice: the accumulator of the micro-batch scan and one
  micro-batch's gradients.
- Activations: the residuals that the backward pass keeps (jax's own `saved_residuals`, traced on abstract
  inputs) of the packed DPO log-prob forward (lidr_jax.train.packing.packed_logprobs) for the rows one device
  holds, in the compute dtype, per remat policy, with the attention implementation: `xla` saves the
  probabilities of every block pair a packed row may list (lidr_jax.train.packing.block_attention; at most
  the blocks on and below the diagonal, about half of [T, T]; all of [B, K, G, T, S] without packing); a
  fused kernel (cudnn, splash) saves q, k, v, its output and the log-sum-exp, traced here with splash in
  interpret mode (the same residuals). The trace is the unsharded program at the per-device rows, so a
  residual that is a whole weight copy is counted whole.
- Transient peaks, analytic and stated as such: one layer's weights gathered in the compute dtype, one
  log-softmax chunk's float32 logits [rows, chunk, V] three times (logits, log-softmax, their gradient),
  and with xla attention under remat (full, dots) the recomputed layer's float32 scores and probabilities
  of its block pairs ([rows, N, T, T] without packing) twice (without remat they are among the saved
  residuals already).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints
from jax.sharding import AbstractMesh

from lidr_jax.model.config import ModelConfig, load_hf_config
from lidr_jax.model.llama import abstract_params, count_params, param_specs
from lidr_jax.parallel.sharding import device_memory, state_shardings
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.packing import attention_block, packed_logprobs
from lidr_jax.train.trainer import init_state, make_optimizer

GiB = 2**30


def size(n: int) -> str:
    """Bytes as GiB (MiB below 0.01 GiB), two decimals."""
    return f"{n / GiB:.2f} GiB" if n >= GiB / 100 else f"{n / 2**20:.2f} MiB"


class DoesNotFitError(ValueError):
    """A training configuration needs more memory per device than the devices have (numbers in the message)."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one DPO training configuration (module docstring)."""

    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    rows: int  # rows per device per micro-batch
    row_tokens: int
    attention: str  # xla | fused
    remat: str
    params: int
    adamw: int
    grads: int
    activations: int
    transient: int

    @property
    def total(self) -> int:
        return self.params + self.adamw + self.grads + self.activations + self.transient

    def describe(self) -> str:
        names = ("params", "adamw", "grads", "activations", "transient")
        parts = ", ".join(f"{name} {size(getattr(self, name))}" for name in names)
        return (
            f"{size(self.total)} per device on a (data, fsdp, tensor) = {self.mesh} mesh ({parts}; {self.rows} "
            f"row(s) of {self.row_tokens} tokens per device, attention {self.attention}, remat {self.remat})"
        )


def compiled_memory(compiled) -> dict[str, int]:
    """A compiled program's memory per device, from the compiler (`memory_analysis()`, on every backend):
    arguments, outputs, temporaries, aliased (donated inputs reused as outputs), code, and their peak
    arguments + outputs + temporaries − aliased. The one reading of it: the load-time fit check, the
    plan and `dpo.row_tokens: auto` all use it."""
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def abstract_mesh(shape: tuple[int, int, int]) -> AbstractMesh:
    return AbstractMesh(tuple(shape), ("data", "fsdp", "tensor"))


def state_bytes(config: ModelConfig, mesh_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(params, AdamW state) bytes on the busiest device of the mesh."""
    optimizer = make_optimizer(DPOConfig(), 100)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params(config))
    shardings = state_shardings(state, param_specs(config), abstract_mesh(mesh_shape))

    def per_device(tree, sh):
        return sum(
            int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sh), strict=True)
        )

    return per_device(state.params, shardings.params), per_device(state.opt_state, shardings.opt_state)


def block_pairs_bound(row_tokens: int) -> tuple[int, int]:
    """(block, M): the attention block of packed rows of `row_tokens` (lidr_jax.train.packing.attention_block)
    and the most block pairs a row can list: every block pair on or below the diagonal (one causal pair
    filling the row; several pairs, or a prompt shared by two answers, list fewer)."""
    block = attention_block(row_tokens)
    nb = row_tokens // block
    return block, nb * (nb + 1) // 2


def activation_bytes(
    config: ModelConfig, rows: int, row_tokens: int, remat: str, chunk: int, fused: bool, blocks: bool = False
) -> int:
    """Residuals kept for the backward pass (weights excluded) of `rows` packed rows of `row_tokens` tokens,
    every token but the first of each row scored (an upper bound on the answer entries). `blocks`: xla
    attention over the block pairs of packed rows (lidr_jax.train.packing.block_attention), as many as
    `block_pairs_bound` allows."""
    T = -(-row_tokens // 128) * 128 if fused else row_tokens  # fused kernels tile rows in blocks of 128
    ints = {k: jax.ShapeDtypeStruct((rows, T), jnp.int32) for k in ("tokens", "positions", "segments")}
    entries = {k: jax.ShapeDtypeStruct((rows, T), jnp.int32) for k in ("logit_index", "targets", "entry_slot")}
    masks = {k: jax.ShapeDtypeStruct((rows, T), jnp.bool_) for k in ("chosen_mask", "rejected_mask")}
    batch = {
        **ints,
        **entries,
        **masks,
        "attention_mask": jax.ShapeDtypeStruct((rows, T), jnp.bool_),
        "weight": jax.ShapeDtypeStruct((rows, 1), jnp.float32),
    }
    if blocks and not fused:
        M = block_pairs_bound(T)[1]
        batch |= {k: jax.ShapeDtypeStruct((rows, M), jnp.int32) for k in ("block_q", "block_k")}
        batch["block_valid"] = jax.ShapeDtypeStruct((rows, M), jnp.bool_)
    impl = "splash_interpret" if fused else "xla"

    def f(p, b):
        return packed_logprobs(p, b, config, chunk=chunk, remat=remat, attention=impl)[0].sum()

    res = saved_residuals(f, abstract_params(config), batch)
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, src in res if "argument" not in src)


def plan_memory(
    model_config: ModelConfig,
    cfg: DPOConfig,
    mesh_shape: tuple[int, int, int],
    *,
    rows_per_micro_batch: int | None = None,
    fused_attention: bool = False,
) -> MemoryPlan:
    """The memory plan of training `model_config` with `cfg` on a mesh of `mesh_shape`. Rows per micro-batch
    default to `batch_size` (packed: at most one row per pair; lidr_jax.train.trainer.pack_plan knows the
    real count once the pairs are read); they are split over the data and fsdp axes. Without packing a
    row is prompt + two answers at their limits."""
    config = model_config.replace(dtype=cfg.compute.compute_dtype, param_dtype="float32")
    row_tokens = cfg.row_tokens or cfg.max_prompt_len + 2 * cfg.max_response_len
    split = mesh_shape[0] * mesh_shape[1]
    rows = -(-(rows_per_micro_batch or cfg.batch_size) // split)
    params, adamw = state_bytes(config, mesh_shape)
    blocks = bool(cfg.row_tokens)  # packed rows attend over their block pairs (lidr_jax.train.packing)
    acts = activation_bytes(
        config, rows, row_tokens, cfg.compute.remat, cfg.compute.logprob_chunk, fused_attention, blocks
    )
    itemsize = jnp.dtype(cfg.compute.compute_dtype).itemsize
    layer = count_params(abstract_params(config)["layers"]) // config.num_hidden_layers * itemsize
    chunk = min(cfg.compute.logprob_chunk or row_tokens, row_tokens)
    logits = 3 * rows * chunk * config.vocab_size * 4
    block, M = block_pairs_bound(row_tokens)
    area = M * block**2 if blocks else row_tokens**2  # scores of one row and head: block pairs, or all of [T, T]
    scores = 0 if fused_attention or cfg.compute.remat == "none" else 2 * rows * config.num_attention_heads * area * 4
    return MemoryPlan(
        tuple(mesh_shape),
        rows,
        row_tokens,
        "fused" if fused_attention else "xla",
        cfg.compute.remat,
        params,
        adamw,
        2 * params,
        acts,
        layer + logits + scores,
    )


def check_fit(plan: MemoryPlan, device_bytes: int, device: str = "device") -> None:
    """Raise `DoesNotFitError` naming the numbers when `plan` needs more than `device_bytes` per device."""
    if plan.total > device_bytes:
        raise DoesNotFitError(
            f"DPO training needs {plan.describe()}, but each {device} has {size(device_bytes)}: use "
            f"more devices (a larger fsdp axis), remat, a smaller batch_size or row_tokens, or bfloat16 compute"
        )


def _local_device(mesh):
    """One of this process's devices of `mesh` (only those report their memory; every device of a mesh is alike)."""
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


def check_training_fits(model_config: ModelConfig, cfg: DPOConfig, mesh, rows_per_micro_batch: int | None = None):
    """The fit check before training: the plan of `cfg` on `mesh` (a jax Mesh with data, fsdp and tensor
    axes) against the memory of one of this process's devices (only those report their memory; every
    device of a mesh is alike); nothing is checked where the backend reports no limit (CPU). Raises
    `DoesNotFitError` with the numbers. Returns the plan, or None when not checked."""
    device = _local_device(mesh)
    limit = device_memory(device)
    if limit is None:
        return None
    shape = tuple(int(mesh.shape.get(axis, 1)) for axis in ("data", "fsdp", "tensor"))
    impl = cfg.compute.attention_impl(shared_prompt=cfg.share_prompt or not cfg.row_tokens)
    plan = plan_memory(
        model_config, cfg, shape, rows_per_micro_batch=rows_per_micro_batch, fused_attention=impl != "xla"
    )
    check_fit(plan, limit, getattr(device, "device_kind", device.platform))
    return plan


def check_model_fits(model: str, cfg: DPOConfig, mesh) -> MemoryPlan | None:
    """The fit check at config load, before any model work (lidr_jax.pipeline.runner.open_run): the
    architecture from a Hugging Face directory's config.json (no weights read) and `batch_size` rows per
    micro-batch (without packing exact; with packing the most a micro-batch can need: the train stage
    checks again with the pairs' own count). None where it cannot tell before loading: a backend that
    reports no device memory (CPU), or a model that is not a directory with config.json (a .gguf file
    holds its architecture inside the weights file; the train stage checks it)."""
    config_file = Path(model).expanduser() / "config.json"
    if device_memory(_local_device(mesh)) is None or not config_file.is_file():
        return None
    return check_training_fits(load_hf_config(config_file), cfg, mesh)
