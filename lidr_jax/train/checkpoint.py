"""Orbax checkpoints: resumable training state, and params-only checkpoints of finished iterations.

Two kinds, both restored onto whatever mesh is current (a checkpoint written on 8 devices with an
fsdp sharding restores on 1 device and the reverse), because restoration is driven by a target of
`jax.ShapeDtypeStruct`s that carry the *current* shardings, never the saved ones:

- `TrainCheckpointer(directory, every, keep)`: an `ocp.CheckpointManager` whose step `s` holds
  `state` (the train state pytree: params, optimizer state, step; `StandardSave`) and `meta` (data
  position, PRNG key data and its implementation; `JsonSave`). Saved every `every` steps and, with
  `force=True`, at the end of training; the last `keep` are kept. Restarting a killed run restores the
  latest finished step, so training continues with the same data order and random stream and ends
  with the parameters of an uninterrupted run.
- `save_params` / `restore_params`: one directory with `params` and the `ModelConfig` (as JSON), so a
  finished iteration's weights describe themselves (export needs nothing else but a tokenizer).

Crash safety comes from Orbax's atomic finalize: a checkpoint is written into
`<step>.orbax-checkpoint-tmp-<time>/` and renamed to `<step>/` only once complete. A save killed half
way leaves only such a temporary directory, which is ignored (and removed by the next manager), so
the previous checkpoint stays the latest.

Directories may be local or any URI Orbax writes (gs://bucket/run/...): paths go through
lidr_jax.files.absolute_path, a local one made absolute (Orbax requires it), a URI kept as an
etils.epath.Path (pathlib would turn gs://bucket into the local gs:/bucket).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lidr_jax.files import AnyPath, absolute_path, plain
from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import abstract_params

PyTree = Any


# ------------------------------------------------------------------------------------ abstract trees


def _replicated() -> jax.sharding.Sharding:
    """Fully replicated over every device: the default for a leaf whose target has no sharding."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract_like(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
    """A restore target: `ShapeDtypeStruct`s with a sharding on the current devices.

    Leaves may be arrays (their own sharding is kept), `ShapeDtypeStruct`s (with or without sharding)
    or numpy values. `shardings`, a matching tree of `jax.sharding.Sharding`, overrides per leaf;
    a leaf left without any sharding is replicated on all devices.
    """
    default = _replicated()

    def one(x, sharding=None):
        if isinstance(x, (jax.ShapeDtypeStruct, jax.Array)):
            shape, dtype, own = x.shape, x.dtype, x.sharding
        else:
            a = np.asarray(x)
            shape, dtype, own = a.shape, a.dtype, None
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or own or default)

    if shardings is None:
        return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, shardings)


def _rng_to_json(rng) -> dict | None:
    """PRNG key -> {"data": uint32 list, "impl": name or None for a raw uint32 key} (exact in JSON)."""
    if rng is None:
        return None
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(rng) if typed else rng)
    return {
        "data": data.astype(np.uint32).tolist(),
        "shape": list(data.shape),
        "impl": str(jax.random.key_impl(rng)) if typed else None,
    }


def _rng_from_json(d: dict | None):
    if d is None:
        return None
    data = jax.numpy.asarray(np.asarray(d["data"], dtype=np.uint32).reshape(d["shape"]))
    return data if d["impl"] is None else jax.random.wrap_key_data(data, impl=d["impl"])


# ------------------------------------------------------------------------------------ train state


class TrainCheckpointer:
    """Periodic, resumable checkpoints of a training run.

    ```python
    ckpt = TrainCheckpointer(run.stage_dir(k, "train") / "checkpoints", every=100, keep=2)
    restored = ckpt.restore_latest(abstract_state)   # abstract_state: ShapeDtypeStructs with shardings
    if restored is not None:
        state, data_position, rng = restored
    for ...:
        state = train_step(state, batch)
        ckpt.save(step, state, data_position, rng)   # a no-op unless step % every == 0
    ckpt.save(step, state, data_position, rng, force=True)   # the final state
    ckpt.close()
    ```

    `data_position` is any JSON value that lets the data pipeline continue where it stopped (e.g.
    `{"epoch": 0, "batch": 37}`); it and the PRNG key are stored exactly. `async_save=True` overlaps
    writing with training (call `wait()` before reading the files); the default is synchronous.
    """

    def __init__(self, directory: str | os.PathLike, every: int, keep: int = 2, *, async_save: bool = False):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every={every} and keep={keep} must both be >= 1")
        self.directory = absolute_path(directory)  # Orbax requires an absolute path; gs://... is one
        self.every = every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            create=True,
            # A save killed half way leaves `<step>.orbax-checkpoint-tmp-*`; remove it at startup.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state: PyTree, data_position: Any = None, rng=None, force: bool = False) -> bool:
        """Save if `step` is a multiple of `every` (or `force`). Returns whether a checkpoint was
        started. Saving a step that already exists is a no-op (the final forced save may coincide with
        a periodic one)."""
        step = int(step)
        if step in self._mgr.all_steps():
            return False
        if not force and step % self.every:
            return False
        meta = {"step": step, "data_position": data_position, "rng": _rng_to_json(rng)}
        return self._mgr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,  # the interval was already decided above
        )

    def restore(self, step: int, abstract_state: PyTree, shardings: PyTree | None = None):
        """`(state, data_position, rng)` of checkpoint `step`, placed per `abstract_state`'s shardings."""
        target = abstract_like(abstract_state, shardings)
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        meta = out["meta"]
        return out["state"], meta["data_position"], _rng_from_json(meta["rng"])

    def restore_latest(self, abstract_state: PyTree, shardings: PyTree | None = None):
        """The latest finished checkpoint as `(state, data_position, rng)`, or None if there is none."""
        step = self._mgr.latest_step()
        return None if step is None else self.restore(step, abstract_state, shardings)

    def wait(self) -> None:
        """Block until an asynchronous save has finished writing."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------ params only


def config_from_json(d: dict) -> ModelConfig:
    """Inverse of `files.plain(config)`; unknown or missing fields are an error naming them."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"model config has unknown field(s) {unknown}: written by a newer lidr_jax?")
    d = dict(d)
    d["rope_scaling"] = tuple((str(k), float(v)) for k, v in d.get("rope_scaling", ()))
    d["eos_token_ids"] = tuple(int(i) for i in d.get("eos_token_ids", ()))
    return ModelConfig(**d)


def save_params(path: str | os.PathLike, params: PyTree, config: ModelConfig) -> AnyPath:
    """Write a params-only checkpoint (params + model config) to directory `path`, atomically.

    An existing directory at `path` is replaced (a stage rerun after a crash before it was marked done).
    """
    path = absolute_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            path,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), model_config=ocp.args.JsonSave(plain(config))
            ),
            force=True,
        )
    return path


def load_params_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` stored in a params-only checkpoint (reads no weights)."""
    path = absolute_path(path)
    if not (path / "model_config").exists():
        raise FileNotFoundError(
            f"{path} is not a lidr_jax params checkpoint (no model_config inside); "
            "it is written by lidr_jax.train.checkpoint.save_params"
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(path, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    return config_from_json(out["model_config"])


def restore_params(
    path: str | os.PathLike,
    *,
    shardings: PyTree | None = None,
    param_dtype: str | None = None,
) -> tuple[PyTree, ModelConfig]:
    """`(params, config)` from a params-only checkpoint, placed per `shardings` (a params-shaped tree
    of `jax.sharding.Sharding`; default: replicated on all current devices). `param_dtype` casts on
    restore (e.g. "bfloat16" for inference) and is recorded in the returned config."""
    path = absolute_path(path)
    config = load_params_config(path)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    target = abstract_like(abstract_params(config), shardings)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    return out["params"], config
