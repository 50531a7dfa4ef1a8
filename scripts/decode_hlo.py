"""What the decode step reads, op by op: compiles a run's `decode:STAGE` program for a TPU topology with
the layers unrolled (1 and 2 layers, as `python -m lidr_jax.plan` estimates cost), and lists the
optimized HLO's largest instructions by the bytes they touch (output + operands), with the compiler's
bytes accessed and time beside the bytes a chip must read (its weights and cache shards).

    python -m scripts.decode_hlo --config configs/lidr_llama3_8b.yaml --set model=DIR \
        --set generation.batch_size=64 --set generation.max_prompt_tokens=1696 --topology v5p-8

A second layer's instructions minus the first's are one layer's; the rest (embedding, final norm,
vocabulary head, sampling) is the step's fixed part. Needs libtpu (the `tpu` extra), no TPU.

The same step is compiled once more without its cache write (each row's new key and value, a few KB,
written in place by a loop over the slots): the difference is what XLA's cost model charges for that
write (it charges the whole cache buffer to each loop), and the step's estimate with the write charged
at its own size instead is printed beside the compiler's, labelled as such. The variant is analysis
only: it replaces `lidr_jax.model.llama._write` in this process while it compiles.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from unittest import mock

import jax
import numpy as np

from lidr_jax.parallel.topology import skip_absent_tpu

skip_absent_tpu()

from lidr_jax.model import llama  # noqa: E402
from lidr_jax.model.attention import compiling_for  # noqa: E402
from lidr_jax.parallel.topology import devices, parse  # noqa: E402
from lidr_jax.pipeline import plan  # noqa: E402
from lidr_jax.pipeline.config import load_run_config  # noqa: E402
from lidr_jax.pipeline.plan_programs import model_architecture, run_programs  # noqa: E402

BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8}
SHAPE = re.compile(r"\b(pred|s8|u8|bf16|f16|s16|f32|s32|u32|f64|s64)\[([0-9,]*)\]")
OPERAND = re.compile(r"%([\w.\-]+)")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) (\w[\w\-]*)\((.*)$")


def shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in SHAPE.findall(text):
        total += BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def entry_instructions(hlo: str) -> list[tuple[str, str, int, int]]:
    """(name, opcode, output bytes, operand bytes) of each instruction of the ENTRY computation."""
    out, inside, sizes = [], False, {}
    for line in hlo.splitlines():
        if line.startswith("ENTRY "):
            inside = True
            continue
        if inside and line.startswith("}"):
            break
        m = INSTRUCTION.match(line) if inside else None
        if m:
            name, result, op, rest = m.groups()
            operands = rest.split("), ")[0] if "), " in rest else rest
            size = shape_bytes(result)
            # operands are printed by name: their bytes are their defining instruction's result
            inputs = sum(sizes.get(ref, 0) for ref in OPERAND.findall(operands)) + shape_bytes(operands)
            sizes[name] = size
            out.append((name, op, size, inputs))
    return out


WEIGHT_COPY = re.compile(r"^\s*%?[\w.\-]+ = (\S+) copy\(.*op_name=\"p\[\\'layers\\'\]\[\\'(\w+)\\'\]\"")


def weight_copies(hlo: str) -> list[tuple[str, int]]:
    """(weight name, bytes) of each copy of a stacked layer weight in the ENTRY computation: a relayout
    the step pays on every call (the parameter's layout is not the one its dot wants), read and written."""
    entry = hlo[hlo.index("\nENTRY ") :]
    return [(m.group(2), shape_bytes(m.group(1))) for m in map(WEIGHT_COPY.match, entry.splitlines()) if m]


@contextlib.contextmanager
def without_cache_write():
    """Compile with the cached calls' new keys and values computed but not written (an optimization
    barrier keeps their projections; the buffer passes through unchanged). A fresh cache's write stays."""
    write = llama._write

    def kept(buf, new, end_B, axis):
        return write(buf, new, end_B, axis) if end_B is None else jax.lax.optimization_barrier((buf, new))[0]

    with mock.patch.object(llama, "_write", kept):
        yield


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--topology", default="v5p-8")
    p.add_argument("--stage", default="generate")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    run = load_run_config(args.config, args.set)
    config = model_architecture(run.model, run.dtype)
    topo = parse(args.topology)
    with compiling_for("tpu"):
        programs, layout, _ = run_programs(run, config, devices(topo), topo.chip.hbm_bytes)
    (program,) = [q for q in programs if q.name == f"decode:{args.stage}"]
    print(f"{topo.name}: {program.note}; decoding layout data={layout.data} tensor={layout.tensor} ({layout.why})")
    rows = {}
    for layers in (1, 2):
        compiled, call_args = plan._compile(program, config.replace(num_hidden_layers=layers, scan_layers=False))
        cost = plan._cost(compiled)
        must = plan._shard_bytes(call_args[0]) + plan._shard_bytes(call_args[2])
        rows[layers] = (cost, must, entry_instructions(compiled.as_text()))
        print(
            f"\n{layers} layer(s): compiler bytes accessed {cost['bytes accessed'] / 1e9:.3f} GB, "
            f"est {cost['optimal_seconds'] * 1e3:.3f} ms; must read (weights + cache shard) {must / 1e9:.3f} GB "
            f"= {must / topo.chip.hbm_bandwidth * 1e3:.3f} ms at {topo.chip.hbm_bandwidth / 1e12:.2f} TB/s"
        )
        copies = weight_copies(compiled.as_text())
        if copies:
            print(
                "  weight relayout copies on every step: "
                + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in copies)
                + f"; {2 * sum(size for _, size in copies) / 1e9:.3f} GB read and written"
            )
        ranked = sorted(rows[layers][2], key=lambda r: -(r[2] + r[3]))[: args.top]
        print(f"  {'instruction':<40} {'opcode':<22} {'out MB':>10} {'operands MB':>12}")
        for name, op, out_b, in_b in ranked:
            print(f"  {name[:40]:<40} {op[:22]:<22} {out_b / 1e6:>10.1f} {in_b / 1e6:>12.1f}")
    (c1, m1, _), (c2, m2, _) = rows[1], rows[2]
    per_layer = c2["bytes accessed"] - c1["bytes accessed"]
    fixed = c1["bytes accessed"] - per_layer
    print(
        f"\nper layer: compiler {per_layer / 1e9:.3f} GB accessed against {(m2 - m1) / 1e9:.3f} GB that must be read "
        f"({per_layer / max(m2 - m1, 1):.2f}x); fixed part {fixed / 1e9:.3f} GB against {(m1 - (m2 - m1)) / 1e9:.3f} GB"
    )
    # The same step without the cache write: what the cost model charges for writing a few KB per layer.
    with without_cache_write():
        bare = {
            n: plan._cost(plan._compile(program, config.replace(num_hidden_layers=n, scan_layers=False))[0])
            for n in (1, 2)
        }
    L, bw = config.num_hidden_layers, topo.chip.hbm_bandwidth

    def whole(c):  # the step's figure for all L layers
        return {k: c[1][k] + (L - 1) * (c[2][k] - c[1][k]) for k in ("bytes accessed", "optimal_seconds")}

    written = 2 * 2 * config.num_key_value_heads * config.head_dim * (program.tokens // layout.data) / layout.tensor
    step, flat, must = whole({n: rows[n][0] for n in (1, 2)}), whole(bare), m1 + (L - 1) * (m2 - m1)
    loop = (step["bytes accessed"] - flat["bytes accessed"]) / L
    print(
        f"the cache write as the cost model charges it ({written / 1e3:.1f} KB per layer): "
        f"{loop / 1e9:.3f} GB and {(step['optimal_seconds'] - flat['optimal_seconds']) / L * 1e3:.3f} ms per layer\n"
        f"the step, {L} layers: compiler's estimate {step['optimal_seconds'] * 1e3:.2f} ms = "
        f"{must / bw / step['optimal_seconds']:.0%} of the HBM roofline ({must / 1e9:.2f} GB at {bw / 1e12:.2f} TB/s); "
        f"without the write {flat['optimal_seconds'] * 1e3:.2f} ms = "
        f"{must / bw / flat['optimal_seconds']:.0%} (the compiler's estimates, not measurements)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
