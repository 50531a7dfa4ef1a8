"""The decode step's weight products alone, XLA:CPU against torch, on this machine: the GEMMs of one
SmolLM2-135M decode step at batch 16 ([16, 576] against the attention, MLP and vocabulary weights),
float32, the mean of 200 calls (20 for the head) after one warm-up each. This is what bounds the sampler's
step on a CPU once its slots are full (BENCHMARKS.md, Sampler).

    python scripts/bench_gemm.py
    XLA_FLAGS=--xla_cpu_enable_fast_math=true python scripts/bench_gemm.py   # try an XLA flag
    python scripts/bench_gemm.py --train 4352   # the DPO train step's GEMMs at T tokens (the floor of
                                                # scripts/bench_dpo.py --profile): forward, input and weight grads
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


def train_gemms(T: int, reps: int = 3) -> None:
    """One layer's projection GEMMs of a SmolLM2 train step at T tokens (float32), as einsums: forward
    x[T, D] w[D, F], the input gradient g[T, F] w[D, F]^T and the weight gradient x[T, D]^T g[T, F]
    (contracting over tokens), for the q/o (576), k/v (192) and MLP (1536) widths; best of `reps`."""
    rng = np.random.default_rng(0)
    print(f"| GEMM at T={T} | jax ms | jax GFLOP/s | torch ms | torch GFLOP/s | torch / jax speed |")
    print("|---|---|---|---|---|---|")
    for width in (576, 192, 1536):
        for name, spec, a_shape, b_shape in (
            ("forward", "td,df->tf", (T, 576), (576, width)),
            ("input grad", "tf,df->td", (T, width), (576, width)),
            ("weight grad", "td,tf->df", (T, 576), (T, width)),
        ):
            a = rng.random(a_shape, np.float32)
            b = rng.random(b_shape, np.float32)
            f = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            f(ja, jb).block_until_ready()
            j = min(_timed(lambda f=f, ja=ja, jb=jb: f(ja, jb).block_until_ready()) for _ in range(reps))
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            torch.einsum(spec, ta, tb)
            t = min(_timed(lambda spec=spec, ta=ta, tb=tb: torch.einsum(spec, ta, tb)) for _ in range(reps))
            flops = 2 * T * 576 * width
            print(
                f"| {name} 576x{width} | {j * 1e3:.1f} | {flops / j / 1e9:.1f} | {t * 1e3:.1f} | "
                f"{flops / t / 1e9:.1f} | {j / t:.2f}x |",
                flush=True,
            )


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=0, help="T: the train step's GEMMs at T tokens instead")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.train:
        print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, torch threads {torch.get_num_threads()}")
        train_gemms(args.train)
        return
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
