"""Multi-host runs: every process runs the same program with the same config and seed.

The rules, stated once:
- Start: `maybe_initialize_distributed()` before anything touches a device (TPU pods auto-detect;
  GPUs/CPUs read LIDR_COORDINATOR / LIDR_NUM_PROCESSES / LIDR_PROCESS_ID, or JAX's own
  JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES / JAX_PROCESS_ID or a detected cluster).
- Generation and scoring are data parallel: each process takes its contiguous `process_shard` of
  the work, runs it on its own devices (`on_this_process`: the params gathered onto a host-local
  mesh) and `gather_objects` hands every process all results, in order. `generate_resumable`
  (lidr_jax.pipeline.resumable) distributes whole chunks instead, one per process per round.
- Training uses one global mesh; each process hands JAX only the rows of a batch its own devices
  hold (`put_process_rows`).
- One writer: process 0 writes the run directory. `run_processes()` gives `RunDir` that role, a
  barrier and a broadcast (`Processes`); the other processes write nothing, and
  `RunDir.mark_done` waits for everyone, so no process reads a stage's files before they exist.
  Orbax checkpoints are written collectively by every process (Orbax coordinates them itself).
- Collectives (`gather_objects`, `broadcast`, `barrier`, `to_host`) must be called by every process
  at the same point of the program. `gather_objects` sends where it was called from, so processes on
  different paths fail there, each naming where every process is, instead of pairing the wrong calls.
- A choice made from what one host sees (its free RAM) is agreed first (`agree_min`), so every
  process compiles and runs the same program.
With one process every helper here is the plain single-process operation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lidr_jax.parallel.sharding import (
    MESH_AXES,
    MeshConfig,
    active,
    batch_sharding,
    decode_layout,
    device_memory,
    make_mesh,
    param_shardings,
    parse_rules,
    place,
    put_batch,
    to_host,
    tree_nbytes,
    use_mesh,
)
from lidr_jax.settings import SettingsError

# ---------------------------------------------------------------------------------------- processes


def distributed_args(env: Mapping[str, str]) -> dict[str, Any] | None:
    """What `jax.distributed.initialize` is called with for environment `env`; None: one process.

    - LIDR_COORDINATOR=host:port, LIDR_NUM_PROCESSES, LIDR_PROCESS_ID: explicit (GPU/CPU clusters).
    - JAX_COORDINATOR_ADDRESS (what `jax.distributed.initialize` itself reads), with JAX_NUM_PROCESSES
      and JAX_PROCESS_ID when the launcher sets them; without those two, JAX takes them from the
      cluster it detects (SLURM, Open MPI, Kubernetes, TPU). JAX_LOCAL_DEVICE_IDS, JAX_COORDINATOR_PORT
      and JAX_COORDINATOR_BIND_ADDRESS are read by JAX itself.
    - LIDR_DISTRIBUTED=1, or a TPU pod slice (TPU_WORKER_HOSTNAMES lists several hosts): JAX
      auto-detects everything ({} here).
    A partial or malformed set raises `SettingsError` naming the variables."""
    for address, count, index, all_or_none in (
        ("LIDR_COORDINATOR", "LIDR_NUM_PROCESSES", "LIDR_PROCESS_ID", True),
        ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", False),
    ):
        if not env.get(address):
            continue
        given = [k for k in (count, index) if env.get(k)]
        if (all_or_none or given) and len(given) < 2:
            missing = [k for k in (count, index) if k not in given]
            raise SettingsError(f"{address} is set but {missing} are not: set {count} and {index} on every process too")
        args: dict[str, Any] = {"coordinator_address": env[address]}
        for key, name in ((count, "num_processes"), (index, "process_id")):
            if env.get(key):
                try:
                    args[name] = int(env[key])
                except ValueError:
                    raise SettingsError(f"{key}={env[key]!r} is not a whole number") from None
        if "num_processes" in args and not 0 <= args["process_id"] < args["num_processes"]:
            raise SettingsError(
                f"{index}={args['process_id']} is out of range for {count}={args['num_processes']} "
                f"(process ids are 0..{args['num_processes'] - 1})"
            )
        return args
    pod = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if env.get("LIDR_DISTRIBUTED", "") in ("1", "true", "auto") or pod:
        return {}
    return None


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize(...)` when the environment asks for it (`distributed_args`); True if
    running multi-process. Call it first, before anything touches a device. Calling it twice is harmless.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    args = distributed_args(os.environ)
    if args is None:
        return False
    jax.distributed.initialize(**args)
    return True


def process_bounds(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """[start, end) of process `index`'s contiguous share of n items (the first n % count get one more)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def process_shard(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This process's contiguous share of `items`; concatenated in process order they are `items`."""
    start, end = process_bounds(len(items), index, count)
    return list(items[start:end])


class OutOfStepError(RuntimeError):
    """The processes of a run reached different collectives: one took a path the others did not."""


_SITE_BYTES = 120


def _call_site() -> str:
    """Where the collective was called from: the first frame outside this module ("run_dir.py:343 mark_done")."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"


def gather_objects(items: Sequence) -> list:
    """Every process's JSON-serialisable `items`, concatenated in process order, on every process."""
    if jax.process_count() == 1:
        return list(items)
    blob = np.frombuffer(json.dumps(list(items)).encode(), np.uint8)
    # each process says where it is: a process on another path fails here, on every side, naming both
    site = _call_site().encode()[:_SITE_BYTES]
    head = np.zeros(8 + _SITE_BYTES, np.uint8)
    head[:8] = np.frombuffer(np.int64(blob.size).tobytes(), np.uint8)
    head[8 : 8 + len(site)] = np.frombuffer(site, np.uint8)
    heads = multihost_utils.process_allgather(head).reshape(-1, 8 + _SITE_BYTES)
    sites = [bytes(h[8:]).rstrip(b"\0").decode(errors="replace") for h in heads]
    if len(set(sites)) > 1:
        where = "; ".join(f"process {i} at {s}" for i, s in enumerate(sites))
        raise OutOfStepError(f"the processes are out of step: {where}; one process took a path the others did not")
    sizes = heads[:, :8].copy().view(np.int64).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    every = multihost_utils.process_allgather(padded)
    out = []
    for row, size in zip(every.reshape(len(sizes), -1), sizes.reshape(-1)):
        out.extend(json.loads(row[: int(size)].tobytes().decode()))
    return out


def broadcast(obj: Any) -> Any:
    """Process 0's JSON-serialisable `obj` on every process (as JSON gives it back)."""
    if jax.process_count() == 1:
        return obj
    return gather_objects([obj] if jax.process_index() == 0 else [])[0]


def agree_min(value: int | None) -> int | None:
    """The least of every process's `value` (None where any process has none): a figure each host
    measures for itself (free RAM) made one, so every process makes the same choice from it."""
    if jax.process_count() == 1:
        return value
    values = gather_objects([value])
    return None if any(v is None for v in values) else min(values)


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier called `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _no_barrier(name: str) -> None:
    return None


def _same(obj: Any) -> Any:
    return obj


@dataclasses.dataclass(frozen=True)
class Processes:
    """How the processes of one run share its directory (lidr_jax.pipeline.run_dir). The default is a
    lone process: it writes, and there is nobody to wait for. `barrier(name)` returns once every process
    has called it; `broadcast(obj)` returns the writer's JSON value on every process."""

    writer: bool = True
    barrier: Callable[[str], None] = _no_barrier
    broadcast: Callable[[Any], Any] = _same


def run_processes() -> Processes:
    """The `Processes` of this run: process 0 writes; `barrier` and `broadcast` above."""
    if jax.process_count() == 1:
        return Processes()
    return Processes(writer=jax.process_index() == 0, barrier=barrier, broadcast=broadcast)


def map_across_processes(fn: Callable[[list], list], items: Sequence) -> list:
    """`fn(share)` on every process's `process_shard` of `items` (a list of JSON values per item),
    gathered on every process in item order. A process with an empty share does not call `fn`."""
    share = process_shard(items)
    return gather_objects(fn(share) if share else [])


# ------------------------------------------------------------------------------------ training data


def process_rows(shape, axis: int = 0) -> slice:
    """The rows (dimension `axis`) of a global batch of `shape` that this process's devices hold under
    the active mesh's batch rule: one contiguous block, because the mesh lays devices out process by
    process (all rows where the rule leaves the rows replicated)."""
    index_map = batch_sharding(shape, axis).addressable_devices_indices_map(tuple(shape))
    spans = [index[axis] for index in index_map.values()]
    return slice(min(s.start or 0 for s in spans), max(shape[axis] if s.stop is None else s.stop for s in spans))


def put_process_rows(tree, axis: int = 0):
    """A global batch of host arrays (the same on every process: built from the same pairs file and
    the same (seed, step) order) onto the active mesh, each process handing JAX only its own
    `process_rows`, assembled with `jax.make_array_from_process_local_data`. One process, or no
    active mesh: `put_batch`."""
    if jax.process_count() == 1 or active() is None:
        return put_batch(tree, axis)

    def one(x):
        x = np.asarray(x)
        rows = (slice(None),) * axis + (process_rows(x.shape, axis),)
        return jax.make_array_from_process_local_data(batch_sharding(x.shape, axis), x[rows], x.shape)

    return jax.tree.map(one, tree)


# ------------------------------------------------------------------------------ per-process models


def generation_mesh(cfg: MeshConfig | None = None, weights: tuple[int, tuple[int, int]] | None = None):
    """(mesh, rules) for work each process does on its own share (generation, scoring). With no active
    mesh: `cfg` over this process's devices. Under an active mesh, this process's devices of it: where
    the devices report their memory and `weights` = (bytes, (query heads, key/value heads)) is given, in
    the decoding layout of lidr_jax.parallel.sharding.decode_layout (weights whole on each device, or
    split by heads within the host; never split on the model width, which decoding would gather at
    every step); else the active mesh itself with one process, or the host's devices with the active
    tensor size and the rest on fsdp."""
    ctx = active()
    if ctx is None:
        cfg = cfg or MeshConfig()
        devices = jax.local_devices()[:1] if cfg.preset == "single" else jax.local_devices()
        return make_mesh(cfg, devices), parse_rules(cfg.rules)
    mine = [d for d in ctx.mesh.devices.flat if d.process_index == jax.process_index()]
    limit = device_memory(mine[0])
    if weights is not None and limit is not None:
        layout = decode_layout(weights[0], limit, len(mine), weights[1])
        return Mesh(np.asarray(mine).reshape(layout.shape), MESH_AXES), ctx.rules
    if jax.process_count() == 1:
        return ctx.mesh, ctx.rules
    tensor = ctx.mesh.shape["tensor"]
    if len(mine) % tensor:
        raise ValueError(
            f"mesh.tensor={tensor} does not divide this host's {len(mine)} devices; generation runs "
            "on each host's own devices, so keep tensor within a host (mesh.preset=fsdp_tensor)"
        )
    return Mesh(np.asarray(mine).reshape(1, len(mine) // tensor, tensor), MESH_AXES), ctx.rules


def local_params(params, specs, mesh: Mesh, rules):
    """`params` placed on `mesh`; a leaf split across processes is first gathered (a collective),
    one leaf at a time, so at most one whole leaf is on the host at once. A leaf already on `mesh`
    stays where it is."""

    def one(x, sharding):
        spans_processes = isinstance(x, jax.Array) and not x.is_fully_addressable
        return place(to_host(x) if spans_processes else x, sharding)

    return jax.tree.map(one, params, param_shardings(specs, mesh, rules))


@contextlib.contextmanager
def on_this_process(model, cfg: MeshConfig | None = None):
    """`model` with its params on this process's own devices (`generation_mesh`), that mesh active."""
    config = model.config
    weight_bytes = tree_nbytes(model.params)
    mesh, rules = generation_mesh(cfg, (weight_bytes, (config.num_attention_heads, config.num_key_value_heads)))
    local = dataclasses.replace(model, params=local_params(model.params, model.param_specs, mesh, rules))
    with use_mesh(mesh, rules):
        yield local
