"""Orbax checkpoints: exact round trips, step keeping, crash safety, and restores across meshes.

The cross-mesh tests run this file as a script in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the flag must be set before JAX starts, and this
pytest process has already started it): one process saves on N devices, another restores on M.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lidr_jax.checkpoint import (
    TrainCheckpointer,
    config_from_json,
    config_to_json,
    load_params_config,
    restore_params,
    save_params,
)
from lidr_jax.config import ModelConfig
from lidr_jax.model import abstract_params

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )
    return ModelConfig(**{**base, **changes})


def make_state(seed: int = 0, shardings=None):
    """Params plus an AdamW state, filled with random values from numpy.

    Values come from numpy and are placed with `device_put` (no XLA compilation): on a loaded 2-core
    machine, compiling a random initialiser per parameter shape costs tens of seconds.
    """
    state = random_tree(abstract_state(), seed)
    return jax.device_put(state, shardings) if shardings is not None else jax.device_put(state)


def random_tree(abstract, seed: int):
    rng = np.random.default_rng(seed)

    def fill(s):
        if np.issubdtype(s.dtype, np.integer):
            return rng.integers(0, 1000, s.shape).astype(s.dtype)
        return rng.standard_normal(s.shape).astype(s.dtype)

    return jax.tree.map(fill, abstract)


def abstract_state():
    params = abstract_params(tiny_config())
    opt_state = jax.eval_shape(optax.adamw(1e-2).init, params)
    return {"params": params, "opt_state": opt_state, "step": jax.ShapeDtypeStruct((), jnp.int32)}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_state_round_trip_is_exact(tmp_path):
    state = make_state()
    rng = jax.random.fold_in(jax.random.key(3), 11)
    with TrainCheckpointer(tmp_path / "ckpt", every=5, keep=2) as ckpt:
        assert ckpt.restore_latest(abstract_state()) is None
        assert ckpt.save(5, state, {"epoch": 1, "batch": 37}, rng)
    with TrainCheckpointer(tmp_path / "ckpt", every=5, keep=2) as ckpt:
        restored, position, rng2 = ckpt.restore_latest(abstract_state())
    assert_trees_equal(restored, state)
    assert position == {"epoch": 1, "batch": 37}
    assert jax.random.key_impl(rng2) == jax.random.key_impl(rng)
    np.testing.assert_array_equal(jax.random.key_data(rng2), jax.random.key_data(rng))
    # The restored stream continues exactly.
    np.testing.assert_array_equal(jax.random.normal(rng2, (4,)), jax.random.normal(rng, (4,)))


def test_raw_uint32_key_and_no_rng(tmp_path):
    state = {"w": jnp.arange(6.0)}
    with TrainCheckpointer(tmp_path, every=1, keep=3) as ckpt:
        ckpt.save(1, state, 0, jax.random.PRNGKey(9))
        ckpt.save(2, state, 5, None)
        _, pos, rng = ckpt.restore(1, state)
        assert pos == 0 and rng.dtype == jnp.uint32
        np.testing.assert_array_equal(rng, jax.random.PRNGKey(9))
        assert ckpt.restore(2, state)[1:] == (5, None)


def test_every_keep_and_final_force(tmp_path):
    state = {"w": jnp.zeros(3)}
    with TrainCheckpointer(tmp_path, every=3, keep=2) as ckpt:
        saved = [s for s in range(1, 11) if ckpt.save(s, {"w": state["w"] + s}, s, None)]
        assert saved == [3, 6, 9]
        assert ckpt.all_steps() == [6, 9]
        assert ckpt.save(10, {"w": state["w"] + 10}, 10, None, force=True)
        assert not ckpt.save(10, state, 10, None, force=True)  # already there: a no-op
        assert ckpt.all_steps() == [9, 10]
        restored, pos, _ = ckpt.restore_latest(state)
    np.testing.assert_array_equal(restored["w"], np.full(3, 10.0))
    assert pos == 10


def test_save_killed_half_way_leaves_previous_checkpoint(tmp_path):
    """A save interrupted before Orbax's rename leaves `<step>.orbax-checkpoint-tmp-*` behind."""
    state = make_state()
    with TrainCheckpointer(tmp_path, every=2, keep=3) as ckpt:
        ckpt.save(2, state, 2, None)
    # Simulate a later save killed mid-write: a copy of a real checkpoint, truncated, under the
    # temporary name Orbax writes to before its atomic rename.
    import shutil

    partial = tmp_path / "4.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "2", partial)
    for f in sorted((partial / "state").rglob("*")):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    (partial / "_CHECKPOINT_METADATA").unlink()
    with TrainCheckpointer(tmp_path, every=2, keep=3) as ckpt:
        assert ckpt.latest_step() == 2
        restored, pos, _ = ckpt.restore_latest(abstract_state())
        # Training continues and saves step 4 for real (Orbax finishes its cleanup of unfinished
        # temporary directories, started in the background at startup, before a save).
        assert ckpt.save(4, state, 4, None)
        assert not partial.exists(), "the manager should remove the unfinished temporary directory"
        assert ckpt.all_steps() == [2, 4]
    assert_trees_equal(restored, state)
    assert pos == 2


def test_every_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="every=0 and keep=2 must both be >= 1"):
        TrainCheckpointer(tmp_path, every=0, keep=2)


# ---------------------------------------------------------------------------------- params only


def test_params_checkpoint_round_trip(tmp_path):
    config = tiny_config(
        attention_bias=True, rope_type="llama3", eos_token_ids=(1, 2), bos_token_id=0,
        rope_scaling=tuple(sorted({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64.0}.items())),
    )
    params = jax.device_put(random_tree(abstract_params(config), 1))
    save_params(tmp_path / "params", params, config)
    assert load_params_config(tmp_path / "params") == config
    restored, config2 = restore_params(tmp_path / "params")
    assert config2 == config
    assert_trees_equal(restored, params)
    # Saving again over a finished checkpoint replaces it (a stage rerun after a crash).
    params2 = jax.device_put(random_tree(abstract_params(config), 2))
    save_params(tmp_path / "params", params2, config)
    assert_trees_equal(restore_params(tmp_path / "params")[0], params2)
    bf16, c16 = restore_params(tmp_path / "params", param_dtype="bfloat16")
    assert c16.param_dtype == "bfloat16" and bf16["embed"].dtype == jnp.bfloat16


def test_params_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a lidr_jax params checkpoint"):
        load_params_config(tmp_path)
    d = config_to_json(tiny_config())
    d["sliding_window"] = 4
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['sliding_window'\]"):
        config_from_json(d)


# ---------------------------------------------------------------------------------- across meshes


def _fsdp_shardings(tree, mesh):
    """Shard every array on its first axis divisible by the device count (fsdp); else replicate."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = mesh.devices.size

    def one(x):
        for axis, size in enumerate(x.shape):
            if size % n == 0 and n > 1:
                spec = [None] * len(x.shape)
                spec[axis] = "fsdp"
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree)


def _worker(mode: str, directory: str) -> None:
    """Subprocess entry: save on all devices (fsdp), or restore onto all devices and check."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("fsdp",))
    abstract = abstract_state()
    shardings = _fsdp_shardings(abstract, mesh)
    if mode == "save":
        state = make_state(shardings=shardings)
        n_sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
        assert jax.device_count() == 1 or n_sharded > 0
        np.savez(os.path.join(directory, "expected.npz"), *[np.asarray(x) for x in jax.tree.leaves(state)])
        with TrainCheckpointer(os.path.join(directory, "ckpt"), every=1, keep=1) as ckpt:
            ckpt.save(3, state, {"batch": 3}, jax.random.key(5))
        print(f"saved on {jax.device_count()} devices")
        return
    with TrainCheckpointer(os.path.join(directory, "ckpt"), every=1, keep=1) as ckpt:
        state, pos, rng = ckpt.restore_latest(abstract, shardings)
    expected = np.load(os.path.join(directory, "expected.npz"))
    leaves = jax.tree.leaves(state)
    assert len(leaves) == len(expected.files)
    for i, (leaf, want) in enumerate(zip(leaves, jax.tree.leaves(shardings))):
        np.testing.assert_array_equal(np.asarray(leaf), expected[f"arr_{i}"])
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
    assert pos == {"batch": 3}
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(5)))
    print(f"restored on {jax.device_count()} devices")


def _run_worker(mode: str, directory: Path, devices: int) -> str:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(directory)], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("save_on,restore_on", [(8, 1), (1, 8)])
def test_restore_across_meshes(tmp_path, save_on, restore_on):
    assert f"saved on {save_on} devices" in _run_worker("save", tmp_path, save_on)
    assert f"restored on {restore_on} devices" in _run_worker("restore", tmp_path, restore_on)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
