"""Device meshes and logical-axis sharding rules (multi-host helpers: lidr_jax.parallel.multihost).

Sharding is data (docs/design.md rule 2). Every parameter, optimizer-state leaf, activation and KV
cache dimension carries a *logical* axis name; one rules table maps logical names to the mesh axes
("data", "fsdp", "tensor"):

    batch -> (data, fsdp)   embed -> fsdp   vocab, q_heads, kv_heads, mlp -> tensor
    layers, head_dim, norm, seq, act_embed -> replicated

Rules (stated once, enforced by `spec_for`):
- A logical name with no rule is an error naming it (no catch-all that silently replicates).
- A mesh axis used twice in one spec (e.g. batch and embed both on fsdp) is an error naming both.
- Divisibility fallback: a dimension keeps the longest prefix of its rule's mesh axes whose total
  size divides it; the remaining axes are replicated for that dimension. SmolLM2's 9 query heads on
  tensor=2 are therefore replicated (the mlp and vocab dimensions are still split), and a decode
  batch of 2 rows on data=2, fsdp=4 is split over data only. Results never change, only memory.

The parameters' logical axes come from the caller as *specs*: a pytree shaped like the params with,
at every leaf, an object with `.shape` and `.axes` (lidr_jax.model.llama.param_specs). This module
knows no model.

Activations and the KV cache are constrained inside the model through `constrain`, a no-op unless
a mesh is active (`use_mesh`), so single-device code pays nothing and tests need no mesh.

Multi-host runs (initialisation, per-process data, data-parallel generation, one writer) build on
these in lidr_jax.parallel.multihost.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lidr_jax.settings import check_settings, setting

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # parameters (lidr_jax.model.llama.param_specs)
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "norm": (),
    # activations and the KV cache [layers, batch, kv_heads, seq, head_dim]
    "batch": ("data", "fsdp"),
    "seq": (),
    "act_embed": (),  # the model width of activations: fsdp already splits the batch
}

Rules = dict[str, tuple[str, ...]]


class ShardingRulesError(ValueError):
    """A logical axis has no rule, a rule names an unknown mesh axis, or a spec reuses a mesh axis."""


def parse_rules(overrides: Sequence[str] = ()) -> Rules:
    """The default table with `overrides` ("logical=axis[+axis]", "logical=" or "logical=none")."""
    rules = dict(DEFAULT_RULES)
    for item in overrides:
        if "=" not in item:
            raise ShardingRulesError(f"mesh.rules entry {item!r}: expected logical=axis[+axis], e.g. 'mlp=tensor'")
        name, axes = (s.strip() for s in item.split("=", 1))
        parts = () if axes.lower() in ("", "none", "null") else tuple(a.strip() for a in axes.split("+"))
        unknown = [a for a in parts if a not in MESH_AXES]
        if not name or unknown:
            raise ShardingRulesError(
                f"mesh.rules entry {item!r}: unknown mesh axis {unknown}; mesh axes are {MESH_AXES}"
            )
        rules[name] = parts
    return rules


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp", "tensor") and sharding-rule overrides."""

    preset: Literal["fsdp", "single", "fsdp_tensor"] = setting(
        "fsdp",
        "fsdp: all devices on fsdp | single: one device | fsdp_tensor: tensor = devices per host, fsdp = the rest",
    )
    data: int | None = setting(
        None, "data-parallel size; null: the preset's; -1: all devices the other axes leave", ge=1, also=(-1,)
    )
    fsdp: int | None = setting(None, "fully sharded size; null: the preset's; -1: the rest", ge=1, also=(-1,))
    tensor: int | None = setting(None, "tensor-parallel size; null: the preset's; -1: the rest", ge=1, also=(-1,))
    rules: tuple[str, ...] = setting(
        (), 'overrides, "logical=axis[+axis]" or "logical=" (replicate), e.g. [mlp=fsdp+tensor]'
    )

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        check_settings(self)
        parse_rules(self.rules)  # a malformed override fails when the config is read


# ------------------------------------------------------------------------------------------- meshes


def mesh_shape(cfg: MeshConfig, num_devices: int, local_devices: int | None = None) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`, with the preset's defaults and one -1 resolved."""
    local = local_devices or num_devices
    preset = {"single": (1, 1, 1), "fsdp": (1, -1, 1), "fsdp_tensor": (1, -1, local)}[cfg.preset]
    sizes = [preset[i] if getattr(cfg, n) is None else getattr(cfg, n) for i, n in enumerate(MESH_AXES)]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1 (the rest)")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a multiple of {fixed}"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices but {num_devices} are present; "
            "set one axis to -1 to take the rest"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: every device of every process; the
    "single" preset takes the first). Devices come process by process, so the outer axes cross hosts
    and tensor stays within one host."""
    if devices is None:
        devices = jax.devices()[:1] if cfg.preset == "single" else jax.devices()
    devices = list(devices)
    host = sum(d.process_index == devices[0].process_index for d in devices)  # devices per host (also of a topology)
    shape = mesh_shape(cfg, len(devices), host)
    try:  # topology-aware order on TPU; plain order elsewhere
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def device_memory(device) -> int | None:
    """The memory a device offers to XLA (bytes), or None where the backend does not say (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """How one host's devices split decoding: `data` ways over the slots, `tensor` ways over the heads and
    the MLP width (mesh (data, 1, tensor)); `why` says how it was chosen."""

    data: int
    tensor: int
    why: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, 1, self.tensor)


def tree_nbytes(tree) -> int:
    """Bytes of every array (or abstract array) in `tree`, unsharded: what the weights of a layout weigh."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def decode_layout(weight_bytes: int, device_bytes: int | None, devices: int, heads: tuple[int, int]) -> DecodeLayout:
    """The layout of decoding on `devices` devices of `device_bytes` each for weights of `weight_bytes`.

    A decode step reads every weight once; weights split on the model width (fsdp) would be gathered at
    every step. So: when the weights take at most a quarter of a device (the rest for the KV cache, which
    grows with the slots, and the step's temporaries), every device holds a whole copy and the slots are
    split; else the heads and the MLP are split over the fewest devices (`tensor`, dividing both head
    counts `heads` = (query, key/value)) that bring the weights under a quarter of a device, and the slots
    over the rest. (Half a device was too little on a v5e chip: the plan's decode step of Llama-3-8B at
    64 slots did not fit with the weights split 2 ways, BENCHMARKS.md.) When no split reaches a quarter
    (Llama-3-70B on a v5p host), the most ways the devices and heads allow, if the weights then take at
    most half a device: less room for the cache, so fewer slots fit. Unknown memory (CPU) counts as
    enough."""
    if device_bytes is None or weight_bytes <= device_bytes // 4:
        why = "weights replicated on every device (they fit in a quarter of one), slots split"
        return DecodeLayout(devices, 1, why)
    ways = [t for t in range(2, devices + 1) if devices % t == 0 and heads[0] % t == 0 and heads[1] % t == 0]
    for t in ways:
        if weight_bytes / t <= device_bytes / 4:
            return DecodeLayout(devices // t, t, f"heads and MLP split {t} ways (tensor), slots over the rest")
    most = ways[-1] if ways else 1
    if weight_bytes / most <= device_bytes / 2:
        share = weight_bytes / most / device_bytes
        why = (
            f"heads and MLP split {most} ways (tensor), the most this host allows: weights take {share:.0%} of a device"
        )
        return DecodeLayout(devices // most, most, why)
    raise ValueError(
        f"generation runs on each host alone, and the weights ({weight_bytes / 2**30:.1f} GiB) take more than "
        f"half of each of its {devices} devices of {device_bytes / 2**30:.1f} GiB even split {most} ways by heads "
        f"{heads}: use hosts with more memory per device, or a smaller model"
    )


# -------------------------------------------------------------------------------------------- rules


def spec_for(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None, shape=None) -> PartitionSpec:
    """PartitionSpec of one array from its logical axes (None = replicated, needs no rule).

    With `mesh` and `shape`, the divisibility fallback of the module docstring applies."""
    used: dict[str, str] = {}
    out = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ShardingRulesError(
                f"logical axis {name!r} (in {tuple(axes)}) has no sharding rule; add one with "
                f"mesh.rules=['{name}=fsdp'] (or '{name}=' to replicate it)"
            )
        mesh_axes = rules[name]
        for a in mesh_axes:
            if a in used:
                raise ShardingRulesError(
                    f"mesh axis {a!r} is used twice in one spec {tuple(axes)}: by {used[a]!r} and {name!r}; "
                    "change one of their rules in mesh.rules"
                )
            used[a] = name
        if mesh is not None and shape is not None:
            mesh_axes = _divisible_prefix(mesh_axes, shape[i], mesh)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*out)


def _divisible_prefix(mesh_axes: tuple[str, ...], dim: int, mesh: Mesh) -> tuple[str, ...]:
    for k in range(len(mesh_axes), 0, -1):
        if dim % math.prod(mesh.shape[a] for a in mesh_axes[:k]) == 0:
            return mesh_axes[:k]
    return ()


def sharding_for(axes, shape, mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, rules, mesh, shape))


# --------------------------------------------------------------------------- parameters and state


def _is_spec(x) -> bool:
    return hasattr(x, "axes") and hasattr(x, "shape")


def param_shardings(specs, mesh: Mesh, rules: Rules | None = None):
    """A NamedSharding per parameter (same tree as the params) from their `specs`."""
    rules = rules or parse_rules()
    return jax.tree.map(lambda s: sharding_for(s.axes, s.shape, mesh, rules), specs, is_leaf=_is_spec)


def place(tree, shardings):
    """Put host (numpy) or device arrays on their shardings. Each device receives only its slice
    (`make_array_from_callback`), so nothing is materialised whole on one device, and it works with
    shardings that span processes (every process passes the same host values, or the same global
    array: one already on the target's devices is resharded there)."""

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        local = isinstance(x, jax.Array) and x.is_fully_addressable and sharding.is_fully_addressable
        if local or (isinstance(x, jax.Array) and x.sharding.device_set == sharding.device_set):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def place_params(params, specs, mesh: Mesh, rules: Rules | None = None):
    """`params` placed on `mesh` by their `specs`' logical axes."""
    return place(params, param_shardings(specs, mesh, rules))


def state_shardings(state, specs, mesh: Mesh, rules: Rules | None = None):
    """Shardings for a pytree that holds the params and param-shaped leaves (TrainState, optimizer
    state): a leaf whose dict-key path ends with a parameter's path and has its shape gets that
    parameter's sharding (Adam's mu/nu follow their weight); every other leaf is replicated."""
    rules = rules or parse_rules()
    by_path = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]:
        by_path[tuple(k.key for k in path)] = (spec.shape, sharding_for(spec.axes, spec.shape, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit and tuple(hit[0]) == tuple(np.shape(leaf)):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, state)


# ------------------------------------------------------------------------------- the active mesh


@dataclasses.dataclass(frozen=True)
class _Active:
    mesh: Mesh
    rules: Rules = dataclasses.field(hash=False)


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("lidr_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None):
    """Activate `mesh` and `rules` for `constrain`, `put_batch` and the train/sampler code paths."""
    token = _ACTIVE.set(_Active(mesh, rules or parse_rules()))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active() -> _Active | None:
    return _ACTIVE.get()


def constrain(x, axes: Sequence[str | None]):
    """`with_sharding_constraint` of x to its logical axes under the active mesh; x itself otherwise."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding_for(axes, x.shape, ctx.mesh, ctx.rules))


def batch_sharding(shape, axis: int = 0, mesh: Mesh | None = None, rules: Rules | None = None):
    """Rows (dimension `axis`) over the "batch" rule, every other dimension replicated."""
    ctx = _ACTIVE.get()
    mesh, rules = mesh or ctx.mesh, rules or ctx.rules
    axes = [None] * len(shape)
    if len(shape) > axis:
        axes[axis] = "batch"
    return sharding_for(axes, shape, mesh, rules)


def batch_split(mesh: Mesh | None = None, rules: Rules | None = None) -> int:
    """How many ways the "batch" rule splits rows on `mesh` (default: the active mesh; 1 without one).
    A batch of fewer rows, or of a count it does not divide, is not split that many ways (the
    divisibility fallback): every device then computes rows it would otherwise share."""
    ctx = _ACTIVE.get()
    if mesh is None and ctx is None:
        return 1
    mesh, rules = mesh or ctx.mesh, rules or ctx.rules
    return math.prod(mesh.shape[a] for a in rules.get("batch", ()))


def rows_for(rows: int, split: int) -> int:
    """`rows` rounded up to a multiple of `split` (a batch every row-splitting device gets a share of)."""
    return split * -(-rows // split)


def put_batch(tree, axis: int = 0):
    """Host arrays of a batch onto the active mesh, rows split (each device gets only its rows; in a
    multi-process run every process passes the same full batch). Unchanged without an active mesh."""
    if _ACTIVE.get() is None:
        return tree
    return jax.tree.map(lambda x: place(x, batch_sharding(np.shape(x), axis)), tree)


def to_host(x) -> np.ndarray:
    """The numpy value of an array, also of one split across processes (then gathered: a collective,
    so every process must call it at the same point)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def train_state_shardings(state, specs):
    """Shardings of a TrainState under the active mesh, or None without one."""
    ctx = _ACTIVE.get()
    return None if ctx is None else state_shardings(state, specs, ctx.mesh, ctx.rules)


def describe_mesh(mesh: Mesh) -> str:
    """For logs: "data=1 fsdp=8 tensor=1 over 8 cpu devices"."""
    sizes = " ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
    return f"{sizes} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"
