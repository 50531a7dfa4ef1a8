"""Per-device memory plan of the paper configs' DPO training, from shapes (lidr_jax.train.memory: eval_shape,
saved_residuals; nothing is allocated or guessed).

    python scripts/memory_plan.py                                  # both paper configs, every target
    python scripts/memory_plan.py --config configs/lidr_llama3_8b.yaml --set dpo.row_tokens=8192

For each config (its dpo settings: batch_size, remat, compute dtype, log-prob chunk, row_tokens or the
prompt + 2 answers limits) and each target (a mesh of all its chips on the fsdp axis), the GiB per device
with xla attention (scores materialised) and with a fused kernel (cudnn on GPU, splash on TPU), and whether
it fits the chip's memory. The architecture is Llama-3-8B's (the configs' model); no weights are read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_shapes import LLAMA_3_8B  # noqa: E402  (scripts/, beside this file)

from lidr_jax.model.config import ModelConfig  # noqa: E402
from lidr_jax.pipeline.config import load_run_config  # noqa: E402
from lidr_jax.train.memory import GiB, plan_memory  # noqa: E402

LLAMA3_8B = ModelConfig(**LLAMA_3_8B)
TARGETS = [  # name, memory per chip in bytes (vendor figures), chips
    ("TPU v5e-8", 16 * GiB, 8),
    ("TPU v4-8", 32 * GiB, 4),
    ("TPU v5p-8", 95 * GiB, 4),
    ("TPU v5e-16", 16 * GiB, 16),
    ("TPU v5e-32", 16 * GiB, 32),
    ("8 x H100 80GB", 80 * 10**9, 8),
    ("8 x H200 141GB", 141 * 10**9, 8),
]
PAPER_CONFIGS = ["configs/lidr_llama3_8b.yaml", "configs/icr_llama3_8b.yaml"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", help="run config YAML (default: both paper configs)")
    ap.add_argument("--set", action="append", default=[], help="override, as the pipeline's --set (dpo.row_tokens=...)")
    args = ap.parse_args(argv)
    for path in args.config or PAPER_CONFIGS:
        cfg = load_run_config(REPO / path, args.set).dpo
        row = cfg.row_tokens or cfg.max_prompt_len + 2 * cfg.max_response_len
        print(
            f"\n{path}: batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum}, "
            + (f"packed rows of {row} tokens" if cfg.row_tokens else f"one row per pair of up to {row} tokens")
            + f", remat {cfg.compute.remat}, compute {cfg.compute.compute_dtype}, "
            + f"log-prob chunk {cfg.compute.logprob_chunk}\n"
        )
        print(
            "| target | mesh | params | AdamW | grads | activations xla / fused | transient xla / fused "
            "| total xla / fused | HBM |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        fit = {False: [], True: []}
        for name, mem, chips in TARGETS:
            plans = [plan_memory(LLAMA3_8B, cfg, (1, chips, 1), fused_attention=f) for f in (False, True)]
            a = plans[0]
            for fused, p in zip((False, True), plans, strict=True):
                if p.total <= mem:
                    fit[fused].append(name)

            def fits(p, mem=mem):
                return f"{p.total / GiB:.1f}" + ("" if p.total <= mem else " (no)")

            print(
                f"| {name} | {a.mesh} | {a.params / GiB:.2f} | {a.adamw / GiB:.2f} | {a.grads / GiB:.2f} | "
                f"{plans[0].activations / GiB:.2f} / {plans[1].activations / GiB:.2f} | "
                f"{plans[0].transient / GiB:.2f} / {plans[1].transient / GiB:.2f} | "
                f"{fits(plans[0])} / {fits(plans[1])} | {mem / GiB:.1f} |"
            )
        print(f"\nfits with xla attention: {', '.join(fit[False]) or 'none'}")
        print(f"fits with the fused kernel: {', '.join(fit[True]) or 'none'}")
    print("\nGiB per device. (no): exceeds the chip's memory. XLA's buffer reuse lowers real peaks; fragmentation")
    print("and the compiler's temporaries raise them: read a total within ~10% of the memory as not safe.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
