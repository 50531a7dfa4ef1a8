"""The decode step's weight products alone, XLA:CPU against torch, on this machine: the GEMMs of one
SmolLM2-135M decode step at batch 16 ([16, 576] against the attention, MLP and vocabulary weights),
float32, the mean of 200 calls (20 for the head) after one warm-up each. This is what bounds the sampler's
step on a CPU once its slots are full (BENCHMARKS.md, Sampler).

    python scripts/bench_gemm.py
    XLA_FLAGS=--xla_cpu_enable_fast_math=true python scripts/bench_gemm.py   # try an XLA flag
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = [(16, 576, 1536), (16, 1536, 576), (16, 576, 576), (16, 576, 49152)]  # MLP up, MLP down, attention, head


def seconds_jax(m: int, k: int, n: int, reps: int) -> float:
    a = jnp.ones((m, k), jnp.float32)
    w = jnp.asarray(np.random.default_rng(0).random((k, n), np.float32))
    f = jax.jit(lambda a, w: a @ w)
    f(a, w).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        r = f(a, w)
    r.block_until_ready()
    return (time.perf_counter() - t) / reps


def seconds_torch(m: int, k: int, n: int, reps: int) -> float:
    a, w = torch.ones(m, k), torch.rand(k, n)
    a @ w
    t = time.perf_counter()
    for _ in range(reps):
        a @ w
    return (time.perf_counter() - t) / reps


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, torch threads {torch.get_num_threads()}")
    print("| M x K x N | jax ms | jax GFLOP/s | torch ms | torch GFLOP/s | torch / jax speed |")
    print("|---|---|---|---|---|---|")
    for m, k, n in SHAPES:
        reps = 20 if n > 10_000 else 200
        j, t = seconds_jax(m, k, n, reps), seconds_torch(m, k, n, reps)
        flops = 2 * m * k * n
        rates = f"{j * 1e3:.3f} | {flops / j / 1e9:.1f} | {t * 1e3:.3f} | {flops / t / 1e9:.1f}"
        print(f"| {m}x{k}x{n} | {rates} | {j / t:.2f}x |")


if __name__ == "__main__":
    main()
