"""Subprocess worker of tests/test_sharding.py; prints one JSON line of results on stdout.

The caller sets XLA_FLAGS=--xla_force_host_platform_device_count=N before this process imports jax
(the pytest process may already hold a 1-device jax). Modes:

    python tests/sharding_worker.py meshes          # 8 devices: every mesh vs one device
    python tests/sharding_worker.py multiprocess    # one of 2 processes (LIDR_COORDINATOR/... env)

Each computation runs once without a mesh (one device: the reference) and once per mesh, so the test
compares numbers that came out of the same process and the same compiled model code.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "scripts")]  # dpo_helpers, lidr_jax, model_shapes

MESHES = [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]
PROMPTS = [
    "Say yes.",
    "Count to five, please.",
    "Hi",
    "What is the capital of France?",
    "Spell dog.",
    "Name three colors.",
    "2+2?",
    "Tell me a joke about cats and dogs.",
]
EXTRA_PAIRS = [
    ("Say no.", "no", "yes"),
    ("Pick a number.", "7", "blue"),
    ("Greet me.", "hello", "..."),
    ("Spell sun.", "s u n", "m o o n"),
]


def tiny():
    """A Model with dims every test mesh divides: 4 q heads, 2 kv heads, width 64, mlp 128, vocab 256.
    Weights ~N(0, 0.1) and norms in [0.5, 1.5] so logits are O(1) and greedy picks are clear."""
    from dpo_helpers import tiny_tokenizer
    from model_shapes import TINY

    from lidr_jax.formats.load import Model
    from lidr_jax.model.config import ModelConfig
    from lidr_jax.model.llama import ParamSpec, param_specs

    config = ModelConfig(**{**TINY, "max_position_embeddings": 256}, eos_token_ids=(3,))
    rng = np.random.default_rng(0)

    def make(spec: ParamSpec):
        if spec.init == "ones":
            return rng.uniform(0.5, 1.5, spec.shape).astype(np.float32)
        return (0.1 * rng.standard_normal(spec.shape)).astype(np.float32)

    params = jax.tree.map(make, param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))
    return Model(config, params, tiny_tokenizer(), "tiny", {})


def pairs(n: int | None = None):
    from dpo_helpers import PAIRS

    from lidr_jax.train.pairs import PreferencePair

    out = [PreferencePair(p, c, r) for p, c, r in PAIRS + EXTRA_PAIRS]
    return out[:n] if n else out


DPO = {"batch_size": 4, "learning_rate": 1e-3, "warmup": 0, "schedule": "constant"}


def dpo_run(model, enc):
    """Reference log-probs then DPO steps (train's own loop); per-step losses and the log-probs."""
    from lidr_jax.model.scoring import ScoringConfig
    from lidr_jax.train.dpo import DPOConfig
    from lidr_jax.train.trainer import reference_logprobs, train

    cfg = DPOConfig(**DPO, compute=ScoringConfig(logprob_chunk=0))
    ref = reference_logprobs(model.params, model.config, enc, cfg, progress=False)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "metrics.jsonl"
        train(model.params, model.config, enc, ref, cfg, metrics_path=path, pad_id=0, progress=False)
        losses = [json.loads(line)["loss"] for line in path.read_text().splitlines()]
    return losses, np.concatenate([ref["chosen"], ref["rejected"]])


def greedy(model, generate_fn=None, prompts=PROMPTS):
    from lidr_jax.sampling.sampler import SamplingConfig, generate

    s = SamplingConfig(max_new_tokens=8, batch_size=8, progress=False)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    return [r.token_ids for r in (generate_fn or generate)(model, chats, s)]


def forward_logits(model):
    from lidr_jax.model.llama import forward
    from lidr_jax.parallel.sharding import put_batch

    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 100, (8, 16)).astype(np.int32)
    mask = np.ones((8, 16), bool)
    mask[::2, :5] = False  # left padding on every other row
    fn = jax.jit(forward, static_argnames="config")
    tokens, mask = put_batch((tokens, mask))
    return np.asarray(fn(model.params, tokens, model.config, attention_mask_BT=mask))


def meshes() -> dict:
    from lidr_jax.model.llama import init_params, param_specs
    from lidr_jax.parallel.sharding import MeshConfig, make_mesh, param_shardings, place_params, use_mesh
    from lidr_jax.train.pairs import encode_pairs

    assert jax.device_count() == 8, jax.devices()
    model = tiny()
    enc = encode_pairs(pairs(), model.tokenizer, 64, 32)
    base_logits, base_tokens = forward_logits(model), greedy(model)
    base_losses, base_ref = dpo_run(model, enc)
    out = {"base_losses": base_losses, "meshes": {}}
    for shape in MESHES:
        mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
        sharded = dataclasses.replace(model, params=place_params(model.params, model.param_specs, mesh))
        flat = jax.tree_util.tree_flatten_with_path(sharded.params)[0]
        shards = {jax.tree_util.keystr(p): [list(s.data.shape) for s in x.addressable_shards] for p, x in flat}
        with use_mesh(mesh):
            t0 = time.perf_counter()
            logits, tokens = forward_logits(sharded), greedy(sharded)
            t1 = time.perf_counter()
            losses, ref = dpo_run(sharded, enc)  # train donates (deletes) the params it was given
            t2 = time.perf_counter()
        out["meshes"][str(shape)] = {
            "logits_diff": float(np.abs(logits - base_logits).max()),
            "loss_diff": float(np.abs(np.asarray(losses) - base_losses).max()),
            "steps": len(losses),
            "ref_logp_diff": float(np.abs(ref - base_ref).max()),
            "tokens_equal": tokens == base_tokens,
            "shards": shards,
            "seconds": [round(t1 - t0, 1), round(t2 - t1, 1)],
        }
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    # Random parameters created already sharded: each device computes only its own shards.
    shardings = param_shardings(param_specs(model.config), mesh)
    created = jax.jit(init_params, static_argnums=0, out_shardings=shardings)(model.config, jax.random.key(3))
    plain = init_params(model.config, jax.random.key(3))
    out["init_sharded"] = {
        "wq_shard": list(created["layers"]["wq"].addressable_shards[0].data.shape),
        "max_diff": max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(created), jax.tree.leaves(plain))
        ),
    }
    return out


def multiprocess() -> dict | None:
    """One of two processes (2 local devices each): DPO on the global (data=2, fsdp=2) mesh, each
    process's rows of the global batch through `put_process_rows`, and data-parallel greedy generation."""
    from lidr_jax.parallel.multihost import maybe_initialize_distributed

    assert maybe_initialize_distributed()
    from jax.experimental import multihost_utils

    from lidr_jax.model.logprobs import pair_logprobs
    from lidr_jax.parallel.multihost import process_shard, put_process_rows
    from lidr_jax.parallel.sharding import MeshConfig, make_mesh, place_params, use_mesh
    from lidr_jax.pipeline.resumable import generate_across_processes
    from lidr_jax.train.pairs import encode_pairs, pair_batch

    assert jax.process_count() == 2 and jax.local_device_count() == 2 and jax.device_count() == 4
    model = tiny()
    all_pairs = pairs(4)  # one DPO step of 4 pairs; 2 pairs per process
    enc = encode_pairs(all_pairs, model.tokenizer, 64, 32)
    base_losses, _ = dpo_run(model, enc)  # this process alone, one device, all pairs
    base_tokens = greedy(model, prompts=PROMPTS[:4])
    logp_fn = jax.jit(lambda p, b: jnp.stack(pair_logprobs(p, b, model.config, chunk=0)[:2], axis=1))  # [pairs, 2]

    def rows(encoded):
        b = pair_batch(encoded, range(len(encoded)), 0, length=128, entries=64)
        return {k: v for k, v in b.items() if k != "weight"}

    # Reference: every process's rows, computed here on one device, in process order.
    base_rows = np.concatenate(
        [
            np.asarray(
                logp_fn(model.params, rows(encode_pairs(process_shard(all_pairs, i, 2), model.tokenizer, 64, 32)))
            )
            for i in range(2)
        ]
    )

    mesh = make_mesh(MeshConfig(data=2, fsdp=-1))
    sharded = dataclasses.replace(model, params=place_params(model.params, model.param_specs, mesh))
    with use_mesh(mesh):
        local_enc = encode_pairs(process_shard(all_pairs), model.tokenizer, 64, 32)  # only this process's pairs
        logp = logp_fn(sharded.params, put_process_rows(rows(enc)))
        logp = np.asarray(multihost_utils.process_allgather(logp, tiled=True))
        losses, _ = dpo_run(sharded, enc)  # last: train donates (deletes) the params it was given
    tokens = greedy(model, generate_across_processes, prompts=PROMPTS[:4])
    result = {
        "process": jax.process_index(),
        "loss_diff": float(np.abs(np.asarray(losses) - base_losses).max()),
        "steps": len(losses),
        "local_pairs": len(local_enc),
        "rows_logp_diff": float(np.abs(logp - base_rows).max()),
        "tokens_equal": tokens == base_tokens,
        "tokens": tokens,
    }
    everyone = multihost_utils.process_allgather(np.asarray([result["loss_diff"], result["rows_logp_diff"]]))
    result["all_processes"] = np.asarray(everyone).tolist()
    return result


if __name__ == "__main__":
    mode = sys.argv[1]
    result = {"meshes": meshes, "multiprocess": multiprocess}[mode]()
    print("RESULT " + json.dumps(result))
