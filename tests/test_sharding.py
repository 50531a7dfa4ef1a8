"""Sharding: meshes give the one-device numbers, parameters are split as the rules say, rule errors
are clear, and two processes on localhost reproduce the one-process run.

Device tests run tests/sharding_worker.py in subprocesses, because the device count
(XLA_FLAGS=--xla_force_host_platform_device_count) must be set before jax initialises and this
pytest process may already hold a 1-device jax. Tolerances (float32): logits and losses 1e-5
absolute; summed sequence log-probs (~10 tokens, magnitude ~50) 1e-4; greedy tokens identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import param_specs
from lidr_jax.parallel.multihost import maybe_initialize_distributed, process_bounds, process_shard
from lidr_jax.parallel.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    ShardingRulesError,
    mesh_shape,
    parse_rules,
    spec_for,
)
from scripts.model_shapes import SMOLLM2_135M

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"
L, D, N, K, H, F, V = 2, 64, 4, 2, 16, 128, 256  # the worker's tiny model


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIDR_", "XLA_FLAGS"))}
    # Unoptimised XLA CPU code compiles ~3x faster; the one-device reference runs in the same process
    # with the same flags, so the comparison is like for like.
    flags = (
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"
    )
    return {**env, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


def _result(stdout: str, stderr: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"worker printed no result; stderr tail:\n{stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def fallbacks(specs, mesh, rules) -> list[str]:
    """Parameter dimensions the divisibility rule replicated, as "path name=size: want -> got" lines."""
    lines = []
    for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: hasattr(x, "axes"))[0]:
        full, got = spec_for(spec.axes, rules), spec_for(spec.axes, rules, mesh, spec.shape)
        for name, size, want, have in zip(spec.axes, spec.shape, full, got):
            if want != have:
                lines.append(f"{jax.tree_util.keystr(path)} {name}={size}: {want} -> {have or 'replicated'}")
    return lines


@pytest.fixture(scope="module")
def mesh_results():
    proc = subprocess.run(
        [sys.executable, str(WORKER), "meshes"], env=_env(8), capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _result(proc.stdout, proc.stderr)


MESHES = ["(8, 1, 1)", "(1, 8, 1)", "(1, 4, 2)", "(2, 2, 2)"]


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_one_device(mesh_results, mesh):
    r = mesh_results["meshes"][mesh]
    assert r["logits_diff"] <= 1e-5
    assert r["steps"] == 3 and r["loss_diff"] <= 1e-5
    assert r["ref_logp_diff"] <= 1e-4
    assert r["tokens_equal"] is True


def _expected_shard(shape_axes, data, fsdp, tensor):
    """The shard shape the default rules promise, written out per logical name (every tiny-model
    dimension divides every test mesh, so no fallback applies)."""
    split = {"embed": fsdp, "q_heads": tensor, "kv_heads": tensor, "mlp": tensor, "vocab": tensor}
    return [size // split.get(name, 1) for size, name in shape_axes]


PARAMS = {
    "['embed']": [(V, "vocab"), (D, "embed")],
    "['lm_head']": [(D, "embed"), (V, "vocab")],
    "['final_norm']": [(D, "norm")],
    "['layers']['attn_norm']": [(L, "layers"), (D, "norm")],
    "['layers']['wq']": [(L, "layers"), (D, "embed"), (N, "q_heads"), (H, "head_dim")],
    "['layers']['wk']": [(L, "layers"), (D, "embed"), (K, "kv_heads"), (H, "head_dim")],
    "['layers']['wo']": [(L, "layers"), (N, "q_heads"), (H, "head_dim"), (D, "embed")],
    "['layers']['w_gate']": [(L, "layers"), (D, "embed"), (F, "mlp")],
    "['layers']['w_down']": [(L, "layers"), (F, "mlp"), (D, "embed")],
}


@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_are_sharded_as_declared(mesh_results, mesh):
    shards = mesh_results["meshes"][mesh]["shards"]
    data, fsdp, tensor = (int(x) for x in mesh.strip("()").split(","))
    for name, axes in PARAMS.items():
        assert shards[name] == [_expected_shard(axes, data, fsdp, tensor)] * 8, name


def test_known_shard_shapes_fsdp4_tensor2(mesh_results):
    shards = mesh_results["meshes"]["(1, 4, 2)"]["shards"]
    assert shards["['layers']['wq']"][0] == [2, 16, 2, 16]
    assert shards["['embed']"][0] == [128, 16]
    assert shards["['layers']['w_down']"][0] == [2, 64, 16]
    assert shards["['layers']['attn_norm']"][0] == [2, 64]


def test_params_created_sharded_equal_plain_init(mesh_results):
    r = mesh_results["init_sharded"]
    assert r["wq_shard"] == [2, 16, 2, 16]
    assert r["max_diff"] <= 1e-6  # same key, same values, only placed differently


# ----------------------------------------------------------------------------------- rules, in-process


def test_unmapped_logical_axis_is_an_error():
    rules = {k: v for k, v in DEFAULT_RULES.items() if k != "mlp"}
    with pytest.raises(ShardingRulesError, match=r"logical axis 'mlp' .* has no sharding rule; add one"):
        spec_for(("layers", "embed", "mlp"), rules)


def test_reused_mesh_axis_is_an_error():
    rules = parse_rules(["mlp=fsdp"])
    with pytest.raises(ShardingRulesError, match=r"mesh axis 'fsdp' is used twice .* by 'embed' and 'mlp'"):
        spec_for(("layers", "embed", "mlp"), rules)
    with pytest.raises(ShardingRulesError, match=r"mesh axis 'fsdp' is used twice .* by 'batch' and 'embed'"):
        spec_for(("batch", "seq", "embed"), DEFAULT_RULES)


def test_bad_rule_override_is_an_error():
    with pytest.raises(ShardingRulesError, match=r"unknown mesh axis \['model'\]"):
        parse_rules(["mlp=model"])
    with pytest.raises(ShardingRulesError, match="expected logical=axis"):
        parse_rules(["mlp"])
    with pytest.raises(ShardingRulesError, match="unknown mesh axis"):
        MeshConfig(rules=("vocab=tensr",))


def test_rule_overrides_and_specs():
    rules = parse_rules(["mlp=fsdp+tensor", "embed=", "vocab=none"])
    assert spec_for(("layers", "embed", "mlp"), rules) == P(None, None, ("fsdp", "tensor"))
    assert spec_for(("vocab", "embed"), rules) == P(None, None)
    assert spec_for(("batch", "seq", "act_embed"), DEFAULT_RULES) == P(("data", "fsdp"), None, None)


def test_divisibility_falls_back_to_replication():
    """SmolLM2-135M: 9 q heads and 3 kv heads cannot split over tensor=2; mlp 1536 and vocab 49152 can."""
    from jax.sharding import AbstractMesh

    smol = ModelConfig(**SMOLLM2_135M)
    mesh = AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))
    rules = parse_rules()
    assert spec_for(("layers", "embed", "q_heads", "head_dim"), rules, mesh, (30, 576, 9, 64)) == P(
        None, "fsdp", None, None
    )
    assert spec_for(("layers", "embed", "mlp"), rules, mesh, (30, 576, 1536)) == P(None, "fsdp", "tensor")
    # A batch of 2 rows on data=2, fsdp=4 keeps the longest dividing prefix: data only.
    mesh8 = AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
    assert spec_for(("batch", "seq"), rules, mesh8, (2, 16)) == P("data", None)
    assert spec_for(("batch", "seq"), rules, mesh8, (8, 16)) == P(("data", "fsdp"), None)
    assert spec_for(("batch", "seq"), rules, mesh8, (3, 16)) == P(None, None)
    lines = fallbacks(param_specs(smol), mesh, rules)
    assert sorted(line.split(" ")[0] for line in lines) == [
        "['layers']['wk']",
        "['layers']['wo']",
        "['layers']['wq']",
        "['layers']['wv']",
    ]


def test_mesh_shapes_from_config():
    assert mesh_shape(MeshConfig(), 8) == (1, 8, 1)
    assert mesh_shape(MeshConfig(preset="single"), 1) == (1, 1, 1)
    assert mesh_shape(MeshConfig(preset="fsdp_tensor"), 32, local_devices=4) == (1, 8, 4)
    assert mesh_shape(MeshConfig(data=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match=r"need 4 devices but 8 are present"):
        mesh_shape(MeshConfig(fsdp=2, tensor=2), 8)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        mesh_shape(MeshConfig(tensor=3), 8)
    with pytest.raises(ValueError, match=r"tensor must be >= 1 \(or -1\), got 0"):
        MeshConfig(tensor=0)


def test_mesh_group_in_run_config():
    from lidr_jax.pipeline.config import load_run_config
    from lidr_jax.settings import SettingsError

    cfg = load_run_config(None, ["mesh.preset=fsdp_tensor", "mesh.tensor=2", "mesh.rules=[mlp=fsdp+tensor]"])
    assert cfg.mesh == MeshConfig(preset="fsdp_tensor", tensor=2, rules=("mlp=fsdp+tensor",))
    with pytest.raises(SettingsError, match="mesh.preset"):
        load_run_config(None, ["mesh.preset=pipeline"])


def test_process_shards_cover_items_in_order():
    items = list(range(10))
    parts = [process_shard(items, i, 3) for i in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert process_bounds(2, 2, 3) == (2, 2)  # more processes than items: an empty share
    assert process_shard(items) == items  # one process


def test_distributed_env_must_be_complete(monkeypatch):
    monkeypatch.setenv("LIDR_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.delenv("LIDR_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("LIDR_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match=r"LIDR_COORDINATOR is set but \['LIDR_NUM_PROCESSES', 'LIDR_PROCESS_ID'\]"):
        maybe_initialize_distributed()


def test_no_distributed_env_means_one_process(monkeypatch):
    for key in ("LIDR_COORDINATOR", "LIDR_DISTRIBUTED", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert maybe_initialize_distributed() is False


# ------------------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process():
    """Two processes x 2 CPU devices (gloo collectives, jax's CPU default): one DPO step on the global
    (data=2, fsdp=2) mesh, each process's own pairs assembled into one batch, and greedy generation
    split over the processes all equal the same work done by one process on one device."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "multiprocess"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(2, LIDR_COORDINATOR=f"127.0.0.1:{port}", LIDR_NUM_PROCESSES="2", LIDR_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=900)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(_result(stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, r in enumerate(outs):
        assert r["process"] == i
        assert r["steps"] == 1 and r["loss_diff"] <= 1e-5
        assert r["local_pairs"] == 2  # each process encoded only its share of the 4 pairs
        assert r["rows_logp_diff"] <= 1e-4
        assert r["tokens_equal"] is True
    assert outs[0]["tokens"] == outs[1]["tokens"]  # every process holds every gathered result
