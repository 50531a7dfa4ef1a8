"""The train step and the decode step measured on a GPU, beside the compiler's TPU estimates (about 5 min).

    python scripts/gpu_steps.py                      # on a GPU machine: Llama-3.2-1B shapes, cudnn and xla
    python scripts/gpu_steps.py --shape TINY --steps 2   # a dry run of the same code on this CPU

Each program is the one `python -m lidr_jax.plan` compiles (lidr_jax.pipeline.plan_programs), here for the
local devices with random weights: the DPO step (packed rows of `--row-tokens`, `share_prompt: false`,
bfloat16 compute, remat full) and the decode step (`--slots` slots of `--cache` cache slots, weights in
bfloat16, the decoding layout of lidr_jax.parallel.sharding.decode_layout). For each attention
implementation it prints the compiled peak memory, the measured step time (median of `--steps` after one
warm-up), MFU (model FLOPs as the plan counts them over the measured time and the GPU's peak bfloat16
FLOP/s) and the decode step's fraction of the HBM roofline (weights + cache bytes per device over the
measured time and the HBM bandwidth). Peak figures are the vendor's dense bfloat16 numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import scripts.model_shapes as shapes  # noqa: E402
from lidr_jax.model.attention import compiling_for  # noqa: E402
from lidr_jax.parallel.sharding import device_memory, use_mesh  # noqa: E402
from lidr_jax.pipeline import plan, plan_programs  # noqa: E402
from lidr_jax.pipeline.config import load_run_config  # noqa: E402
from lidr_jax.train.memory import compiled_memory  # noqa: E402

GPUS = {  # device_kind substring: (peak bfloat16 FLOP/s dense, HBM bytes/s)
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}


def concrete(tree, seed: int = 0):
    """Arrays for abstract arguments, on their shardings: floats small random values, integers and masks 1."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for x, k in zip(leaves, keys):
        if jnp.issubdtype(x.dtype, jnp.floating):
            fn = jax.jit(
                lambda k, x=x: (0.02 * jax.random.normal(k, x.shape)).astype(x.dtype), out_shardings=x.sharding
            )
        else:
            fn = jax.jit(lambda k, x=x: jnp.ones(x.shape, x.dtype), out_shardings=x.sharding)
        out.append(fn(k))
    return jax.tree.unflatten(treedef, out)


def timed(program, config, steps: int, platform: str):
    with use_mesh(program.mesh, program.rules), compiling_for(platform):
        fn, abstract = program.build(config)
        start = time.perf_counter()
        compiled = fn.lower(*abstract).compile()
        compile_s = time.perf_counter() - start
    args = list(concrete(abstract))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
        if program.kind == "train":
            args[0] = out[0]  # the donated state
        elif program.kind == "decode":
            args[2] = out[1]  # the donated cache
    peak = compiled_memory(compiled)["peak"]
    return statistics.median(times[1:]), compile_s, peak, abstract


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="LLAMA_3_2_1B", help="an architecture of scripts/model_shapes.py")
    p.add_argument("--row-tokens", type=int, default=4096)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--cache", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--attention", default="cudnn,xla")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    platform = device.platform if device.platform != "cuda" else "gpu"
    peak, bandwidth = next((v for k, v in GPUS.items() if k in device.device_kind), (None, None))
    print(f"{len(jax.devices())} x {device.device_kind} ({platform}); peak {peak} FLOP/s, HBM {bandwidth} B/s")
    shape = getattr(shapes, args.shape)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shapes.write_config_dir(shape, tmp)
        attentions = args.attention.split(",")
        if platform != "gpu" and "cudnn" in attentions:  # the dry run on a CPU: the same code, xla only
            print("cudnn: skipped, no NVIDIA GPU here")
            attentions.remove("cudnn")
        for attention in attentions:
            sets = [
                f"model={tmp}",
                "dtype=bfloat16",
                "reward=lidr",
                "check.enabled=false",
                f"generation.batch_size={args.slots}",
                f"generation.max_new_tokens={args.cache // 2}",
                f"generation.max_prompt_tokens={args.cache // 2}",
                "dpo.batch_size=1",
                "dpo.grad_accum=1",
                f"dpo.row_tokens={args.row_tokens}",
                f"dpo.max_prompt_len={args.row_tokens // 4}",
                f"dpo.max_response_len={args.row_tokens // 4}",
                "dpo.share_prompt=false",
                f"dpo.compute.attention={attention}",
                "dpo.compute.compute_dtype=bfloat16",
                "dpo.compute.remat=full",
            ]
            run = load_run_config(None, sets)
            config = plan_programs.model_architecture(run.model, run.dtype)
            with compiling_for(platform):
                programs, layout, _ = plan_programs.run_programs(run, config, jax.devices(), device_memory(device))
            for program in (programs[0], next(x for x in programs if x.kind == "decode")):
                seconds, compile_s, mem_peak, abstract = timed(program, config, args.steps, platform)
                row = {"attention": attention, "program": program.name, "seconds": seconds, "compile_s": compile_s}
                row["peak_gib"] = mem_peak / 2**30
                if program.kind == "train" and peak:
                    flops = plan.model_flops(config, program.tokens, program.row_tokens, train=True)
                    row["mfu"] = flops / program.mesh.devices.size / (seconds * peak)
                if program.kind == "decode" and bandwidth:
                    must_read = plan._shard_bytes(abstract[0]) + plan._shard_bytes(abstract[2])
                    row["hbm_roofline_fraction"] = must_read / bandwidth / seconds
                print(json.dumps(row))
                results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
