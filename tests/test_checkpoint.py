"""Orbax checkpoints: exact round trips, step keeping, crash safety, and restores across meshes.

The cross-mesh and kill-and-resume tests run this file as a script in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the flag must be set before JAX starts, and this
pytest process has already started it): one process saves on N devices, another restores on M.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dpo_helpers import tiny_config as base_config

from lidr_jax.files import atomic_write_jsonl, plain
from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import abstract_params
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.train.checkpoint import (
    TrainCheckpointer,
    config_from_json,
    load_params_config,
    restore_params,
    save_params,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> ModelConfig:
    return base_config(64, **{"max_position_embeddings": 128, "eos_token_ids": (), **changes})


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


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    """A kill can cut the last line of metrics.jsonl; resuming drops it with a warning (and the lines past
    the restored step), while a damaged line before the last is an error naming file and line."""
    from lidr_jax.pipeline.train_stages import MetricsFileError, _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3))
    path.write_text(rows + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match="dropped a last line cut by a kill"):
        _truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(MetricsFileError, match=f"{path}:2: not JSON, and not a last line cut by a kill"):
        _truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"ste\n{"step": 2}\n'  # nothing lost


def test_params_checkpoint_round_trip(tmp_path):
    config = tiny_config(
        attention_bias=True,
        rope_type="llama3",
        eos_token_ids=(1, 2),
        bos_token_id=0,
        rope_scaling=tuple(
            sorted(
                {
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64.0,
                }.items()
            )
        ),
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
    d = plain(tiny_config())
    d["sliding_window"] = 4
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['sliding_window'\]"):
        config_from_json(d)


# ---------------------------------------------------------------------------------- across meshes


def _fsdp_shardings(tree, mesh):
    """Shard every array on its first axis divisible by the device count (fsdp); else replicate."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

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
        [sys.executable, __file__, mode, str(directory)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("save_on,restore_on", [(8, 1), (1, 8)])
def test_restore_across_meshes(tmp_path, save_on, restore_on):
    assert f"saved on {save_on} devices" in _run_worker("save", tmp_path, save_on)
    assert f"restored on {restore_on} devices" in _run_worker("restore", tmp_path, restore_on)


# ---------------------------------------------------------------------------------- kill and resume

CHECKPOINT_EVERY = 2
KILL_AFTER_CHECKPOINTS = 2


def _train_config(run_path: str, model_dir: str):
    from lidr_jax.model.scoring import ScoringConfig
    from lidr_jax.pipeline.config import RunConfig
    from lidr_jax.train.dpo import DPOConfig

    dpo = DPOConfig(
        learning_rate=1e-3,
        warmup=2,
        epochs=2,
        batch_size=2,
        grad_accum=1,
        seed=0,
        compute=ScoringConfig(batch_size=4),
        max_prompt_len=64,
        max_response_len=32,
    )
    return RunConfig(model=model_dir, run_dir=run_path, dpo=dpo, checkpoint_every=CHECKPOINT_EVERY, checkpoint_keep=2)


def _train_worker(run_path: str, model_dir: str) -> None:
    """Subprocess entry: the real train stage (lidr_jax.pipeline.train_stages) of iteration 1 on a tiny model.

    Each checkpoint save is followed by a short sleep (`SLOW_SAVE_S`) so the parent can kill the
    process mid-run; the sleep changes timing only, never what is computed."""
    import time

    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.parallel.sharding import make_mesh, parse_rules
    from lidr_jax.pipeline import train_stages
    from lidr_jax.pipeline.iteration import Iteration
    from lidr_jax.pipeline.models import RunModels

    class SlowCheckpointer(TrainCheckpointer):
        def save(self, *args, **kwargs):
            saved = super().save(*args, **kwargs)
            if saved:
                time.sleep(float(os.environ.get("SLOW_SAVE_S", "0")))
            return saved

    train_stages.TrainCheckpointer = SlowCheckpointer
    cfg = _train_config(run_path, model_dir)
    run = RunDir(run_path, config=plain(cfg), seed=cfg.seed)
    models = RunModels(model_dir, cfg.dtype, make_mesh(cfg.mesh), parse_rules(), base=load_pretrained(model_dir))
    it = Iteration(cfg, run, 1, models)
    if not run.is_done(1, "reference"):
        run.mark_done(1, "reference", train_stages.reference_stage(it))
    run.mark_done(1, "train", train_stages.train_stage(it))
    print("TRAINED", flush=True)


def _write_pairs(run: RunDir) -> None:
    words = ["cat", "dog", "sun", "tree", "river", "house", "bread", "snow", "wind", "stone", "lamp", "bird"]
    rows = [{"prompt": f"Say {w}.", "chosen": f"{w} {w}!", "rejected": f"no {i}"} for i, w in enumerate(words)]
    path = atomic_write_jsonl(run.stage_dir(1, "pairs") / "pairs.jsonl", rows)
    run.mark_done(1, "pairs", {"pairs": path})


def _start_training(run_path: Path, model_dir: Path, slow_save_s: float) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", SLOW_SAVE_S=str(slow_save_s))
    # The three runs compile the same functions: share a persistent compilation cache (test time only).
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(run_path.parent / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, __file__, "train", str(run_path), str(model_dir)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_parameters(make_hf_model, tmp_path):
    pytest.importorskip(
        "lidr_jax.pipeline.train_stages", reason="needs the train stage (lidr_jax/pipeline/train_stages.py)"
    )
    import signal
    import time

    model_dir = make_hf_model("llama", seed=7)
    runs = {}
    for name in ("killed", "uninterrupted"):
        cfg = _train_config(str(tmp_path / name), str(model_dir))
        runs[name] = RunDir(tmp_path / name, config=plain(cfg), seed=cfg.seed)
        _write_pairs(runs[name])

    # 1. Start, SIGKILL once the KILL_AFTER_CHECKPOINTS-th checkpoint is finalised.
    ckpt_dir = tmp_path / "killed" / "iter_1" / "train" / "checkpoints"
    proc = _start_training(tmp_path / "killed", model_dir, slow_save_s=1.0)
    deadline = time.monotonic() + 240
    while True:
        steps = sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()) if ckpt_dir.exists() else []
        if len(steps) >= KILL_AFTER_CHECKPOINTS or proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed:\n" + proc.stdout.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not RunDir(tmp_path / "killed").is_done(1, "train")
    with TrainCheckpointer(ckpt_dir, every=CHECKPOINT_EVERY) as ckpt:
        killed_at = ckpt.latest_step()
    assert killed_at is not None and killed_at >= KILL_AFTER_CHECKPOINTS * CHECKPOINT_EVERY

    # 2. Rerun the same command: it resumes from the last checkpoint and finishes.
    proc = _start_training(tmp_path / "killed", model_dir, slow_save_s=0)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert f"resuming from the checkpoint at step {killed_at}" in log

    # 3. An uninterrupted run with the same seed and data ends with the same parameters, bit for bit.
    proc = _start_training(tmp_path / "uninterrupted", model_dir, slow_save_s=0)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "resuming" not in log
    resumed, _ = restore_params(RunDir(tmp_path / "killed").outputs(1, "train")["policy"])
    straight, _ = restore_params(RunDir(tmp_path / "uninterrupted").outputs(1, "train")["policy"])
    start = load_pretrained_params(model_dir)
    assert_trees_equal(resumed, straight)
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(start))
    )
    assert moved > 1e-4, "training did not change the parameters; the comparison would mean nothing"


def load_pretrained_params(model_dir):
    from lidr_jax.formats.load import load_pretrained

    return load_pretrained(model_dir).params


if __name__ == "__main__":
    if sys.argv[1] == "train":
        _train_worker(sys.argv[2], sys.argv[3])
    else:
        _worker(sys.argv[1], sys.argv[2])
