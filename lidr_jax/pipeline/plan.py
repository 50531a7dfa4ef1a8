"""`python -m lidr_jax.plan`: every program of a run compiled for TPU topologies, on any machine.

For each `--topology` the run's mesh is built over the topology's devices (libtpu gives them without a
TPU: lidr_jax.parallel.topology) and every program of lidr_jax.pipeline.plan_programs is compiled for
it from abstract arrays (no weights, no data). Per program the report gives:

- memory per chip from the compiler (`memory_analysis`: arguments, outputs, temporaries, aliased; peak
  = arguments + outputs + temporaries - aliased) and whether it fits the chip's HBM;
- the collectives of the optimized HLO (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute): count and bytes, as the compiled program lists them;
- the compiler's cost estimate (`cost_analysis`: FLOPs, bytes accessed, its `optimal_seconds`). XLA counts
  a loop's body once, so the estimate comes from two more compiles with the layers unrolled (1 and 2
  layers), extrapolated linearly to the model's depth; a train step is one micro-batch's step times
  `grad_accum`. Chunked prefill keeps its chunk loop: its estimate counts one chunk;
- from these, labelled as the compiler's estimate and not a measurement: the train step's MFU (model
  FLOPs 6 N per token plus causal attention, over the estimated time and the chips' peak), and the decode
  step's fraction of the HBM roofline (the bytes a chip must read, its weights and cache shards, over
  the estimated time and the chip's HBM bandwidth);
- the compile time.

A program that several topologies share (a host's generation compiles on a one-host topology: the
same program on v5e-16, v5e-32 and v5e-256) is compiled once per command and reported for each.

A program that does not fit or does not compile exits 2 with one line naming the program, the topology
and the compiler's numbers, and what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from lidr_jax.model.attention import compiling_for
from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import abstract_params
from lidr_jax.parallel.multihost import agree_min
from lidr_jax.parallel.sharding import describe_mesh, device_memory, parse_rules, use_mesh
from lidr_jax.parallel.topology import Topology, TopologyError, devices, host_devices, parse
from lidr_jax.pipeline.config import load_run_config
from lidr_jax.pipeline.plan_programs import (
    PlanInputError,
    Program,
    model_architecture,
    planned_dpo,
    run_programs,
    train_programs,
)
from lidr_jax.settings import SettingsError
from lidr_jax.train.memory import DoesNotFitError, check_model_fits, compiled_memory, plan_memory

GiB = 2**30
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}


class DoesNotFitOrCompile(RuntimeError):
    """A program of the plan does not fit its chips, or the compiler refused it (one line)."""


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in an optimized HLO module's text (an async op counted
    at its start; bytes: the op's result)."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for m in _COLLECTIVE.finditer(hlo_text):
        shape, op = m.group(1), m.group(2)
        size = sum(
            _BYTES.get(t, 8) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for t, dims in _ARRAY.findall(shape)
        )
        out[op]["count"] += 1
        out[op]["bytes"] += size
    return out


def _compile(program: Program, config: ModelConfig, build=None, platform: str = "tpu"):
    with use_mesh(program.mesh, program.rules), compiling_for(platform):
        fn, args = (build or program.build)(config)
        return fn.lower(*args).compile(), args


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed", "optimal_seconds")}


def estimate_cost(program: Program, config: ModelConfig) -> dict[str, float]:
    """The compiler's cost of the whole program: 1- and 2-layer compiles with the layers unrolled,
    extrapolated to the model's layers, times `program.repeat` (module docstring)."""
    build = program.cost_build or program.build
    c1, c2 = (
        _cost(_compile(program, config.replace(num_hidden_layers=n, scan_layers=False), build)[0]) for n in (1, 2)
    )
    L = config.num_hidden_layers
    # A negative figure is the compiler's "unknown"; the estimate is then unknown too.
    return {k: None if min(c1[k], c2[k]) < 0 else program.repeat * (c1[k] + (L - 1) * (c2[k] - c1[k])) for k in c1}


def _shard_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays with shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def model_flops(config: ModelConfig, tokens: int, row_tokens: int, train: bool) -> float:
    """6 N per trained token (2 N forward), plus causal attention (QK and PV over half the row on average)."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
    n -= config.vocab_size * config.hidden_size  # the embedding is a lookup (a tied lm_head is counted below)
    if config.tie_word_embeddings:
        n += config.vocab_size * config.hidden_size
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * row_tokens
    return (3 if train else 1) * (2 * n + attention) * tokens


def analyse(program: Program, config: ModelConfig, topo: Topology, with_cost: bool = True) -> dict:
    start = time.perf_counter()
    try:
        compiled, args = _compile(program, config)
    except Exception as e:  # the compiler's own first line is the message (XlaRuntimeError, ValueError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not ("RESOURCE_EXHAUSTED" in first or "Ran out of memory" in first):
            raise DoesNotFitOrCompile(f"{program.name} does not compile for {topo.name}: {first}") from None
        # The compiler refused it for memory: a row that does not fit, with the compiler's own numbers.
        return {
            "program": program.name,
            "note": program.note,
            "mesh": describe_mesh(program.mesh),
            "fits": False,
            "compiler": first,
            "compile_seconds": round(time.perf_counter() - start, 1),
        }
    seconds = time.perf_counter() - start
    memory = compiled_memory(compiled)
    row = {
        "program": program.name,
        "note": program.note,
        "mesh": describe_mesh(program.mesh),
        "memory": memory,
        "fits": memory["peak"] <= topo.chip.hbm_bytes,
        "collectives": collectives(compiled.as_text()),
        "compile_seconds": round(seconds, 1),
    }
    if not with_cost:
        return row
    cost = estimate_cost(program, config)
    row["cost"] = {**cost, "source": "compiler, layers unrolled at 1 and 2, extrapolated"}
    est = cost["optimal_seconds"] or 0.0
    chips = program.mesh.devices.size
    if program.kind == "train" and est > 0:
        flops = model_flops(config, program.tokens, program.row_tokens, train=True)
        row["estimated_mfu"] = flops / chips / (est * topo.chip.peak_flops)
    if program.kind == "decode" and est > 0:
        must_read = _shard_bytes(args[0]) + _shard_bytes(args[2])  # weights and cache held by one chip
        row["decode"] = {
            "bytes_per_chip": must_read,
            "roofline_seconds": must_read / topo.chip.hbm_bandwidth,
            "estimated_roofline_fraction": must_read / topo.chip.hbm_bandwidth / est,
        }
    row["compile_seconds"] = round(time.perf_counter() - start, 1)
    return row


GPUS = {"h100": 80, "h200": 141, "a100": 80}  # GB of HBM per GPU (the 80 GB / 141 GB parts)


@dataclasses.dataclass(frozen=True)
class GPUNode:
    name: str
    gpus: int
    hbm_bytes: int


def gpu_node(name: str) -> GPUNode | None:
    """`h100-8` (8 x H100 80GB), `h200-8`, `a100-8`: a GPU node, planned analytically (no GPU compiler here)."""
    m = re.fullmatch(r"(h100|h200|a100)-(\d+)", name.strip().lower())
    return GPUNode(f"{m.group(2)} x {m.group(1).upper()}", int(m.group(2)), GPUS[m.group(1)] * 10**9) if m else None


def plan_gpu(run, config: ModelConfig, node: GPUNode, log=print) -> dict:
    """The DPO step's analytic memory plan (lidr_jax.train.memory: shapes, saved residuals) on a node of
    GPUs, every GPU on fsdp: no compiler for a GPU answers on a machine without one. Attention as `auto`
    resolves it on a GPU (cuDNN in bfloat16)."""
    with compiling_for("gpu"):
        impl = run.dpo.compute.attention_impl(shared_prompt=run.dpo.share_prompt or not run.dpo.row_tokens)
    plan = plan_memory(config, run.dpo, (1, node.gpus, 1), fused_attention=impl != "xla")
    row = {
        "program": "train",
        "note": "analytic (no GPU compiler on this machine)",
        "memory": {"peak": plan.total},
        "fits": plan.total <= node.hbm_bytes,
        "source": "analytic",
        "attention": impl,
    }
    log(f"{node.name} (analytic): train needs {plan.describe()}; {'fits' if row['fits'] else 'DOES NOT FIT'}")
    return {"topology": node.name, "chips": node.gpus, "hbm_per_chip": node.hbm_bytes, "programs": [row]}


def analytic_train_peak(run, config: ModelConfig, mesh) -> int:
    """The analytic memory plan's bytes per chip for the run's DPO step on `mesh` (lidr_jax.train.memory),
    reported beside the compiler's: where no compiler answers (a GPU), that figure is all there is."""
    dpo = planned_dpo(run.dpo)
    with compiling_for("tpu"):
        impl = dpo.compute.attention_impl(shared_prompt=dpo.share_prompt or not dpo.row_tokens)
    shape = tuple(mesh.shape[axis] for axis in ("data", "fsdp", "tensor"))
    return plan_memory(config, dpo, shape, fused_attention=impl != "xla").total


def program_key(program: Program) -> tuple:
    """What makes two programs one: the same name and shapes on the same devices (a host's generation
    compiles on a one-host topology, the same for every slice of that chip and host shape)."""
    devs = tuple((d.device_kind, d.id, tuple(getattr(d, "coords", ()))) for d in program.mesh.devices.flat)
    return program.name, program.note, program.tokens, program.mesh.devices.shape, devs


def plan_topology(
    run,
    config: ModelConfig,
    topo: Topology,
    with_cost: bool = True,
    log=print,
    only: tuple[str, ...] = (),
    done: dict | None = None,
) -> dict:
    """The report of one topology. `done` (program_key -> (topology, row)), shared across the topologies
    of one command: a program compiled already (a host's generation on v5e-16 and v5e-32) is reported
    again, not compiled again."""
    done = {} if done is None else done
    devs = devices(topo)
    try:
        with compiling_for("tpu"):
            programs, layout, mesh = run_programs(run, config, devs, topo.chip.hbm_bytes, host_devices(topo, devs))
    except ValueError as e:
        raise DoesNotFitOrCompile(f"{topo.name}: {e}") from None
    log(f"{topo.name} ({topo.slice_name}, {topo.chips} chips, {topo.hosts} host(s)): run mesh {describe_mesh(mesh)}")
    rows = []
    if layout.data:
        log(f"  decoding on each host: {layout.why} (data={layout.data}, tensor={layout.tensor})")
    elif not only or any(name.split(":")[0] in ("prefill", "decode") for name in only):
        row = {"program": "generation", "note": "every generation stage", "fits": False, "reason": layout.why}
        log("  " + format_row(row))
        rows.append(row)
    for program in programs:
        if only and program.name not in only and program.name.split(":")[0] not in only:
            continue
        key = program_key(program)
        if key in done:
            where, row = done[key]
            row = {**row, "same_as": where}
        else:
            row = analyse(program, config, topo, with_cost)
            if program.name == "train":  # beside the compiler's figure, or its refusal
                row["analytic_peak"] = analytic_train_peak(run, config, program.mesh)
            if not row["fits"]:
                row["advice"] = advice(program.name, planned_dpo(run.dpo))
            done[key] = (topo.name, row)
        log("  " + format_row(row))
        rows.append(row)
    return {
        "topology": topo.name,
        "slice": topo.slice_name,
        "chips": topo.chips,
        "hosts": topo.hosts,
        "hbm_per_chip": topo.chip.hbm_bytes,
        "decode_layout": {"data": layout.data, "tensor": layout.tensor, "why": layout.why},
        "programs": rows,
    }


def format_row(row: dict) -> str:
    if "compiler" in row:
        where = f"as compiled for {row['same_as']}" if "same_as" in row else f"compile {row['compile_seconds']:.0f} s"
        return f"{row['program']:<18} DOES NOT FIT: {row['compiler']} ({where})"
    if "reason" in row:
        return f"{row['program']:<18} CANNOT RUN: {row['reason']}"
    m = row["memory"]
    coll = ", ".join(f"{v['count']} {k}" for k, v in row["collectives"].items() if v["count"]) or "no collectives"
    parts = [
        f"{row['program']:<18} peak {m['peak'] / GiB:7.2f} GiB {'fits' if row['fits'] else 'DOES NOT FIT'}",
        f"temp {m['temporaries'] / GiB:.2f} GiB",
        coll,
    ]
    if "analytic_peak" in row:
        parts.append(f"analytic plan {row['analytic_peak'] / GiB:.2f} GiB")
    if "cost" in row:
        est = row["cost"]["optimal_seconds"]
        parts.append("est time unknown" if est is None else f"est {est * 1e3:.1f} ms")
    if "estimated_mfu" in row:
        parts.append(f"est MFU {row['estimated_mfu']:.0%}")
    if "decode" in row:
        parts.append(f"est HBM roofline {row['decode']['estimated_roofline_fraction']:.0%}")
    parts.append(
        f"the program compiled for {row['same_as']}" if "same_as" in row else f"compile {row['compile_seconds']:.0f} s"
    )
    return "; ".join(parts)


def advice(program: str, dpo=None) -> str:
    """What to change when `program` does not fit (for the train step, given the run's `dpo` settings as
    the plan compiled them: only what is not already so)."""
    if program == "train" and dpo is not None:
        options = ["more chips"]
        if dpo.row_tokens:
            options.append("a smaller dpo.row_tokens")
        else:
            options.append("a smaller dpo.batch_size")
            options.append("packed rows (dpo.row_tokens, and on a TPU dpo.share_prompt: false for splash attention)")
        if dpo.compute.remat != "full":
            options.append("dpo.compute.remat: full")
        return ", ".join(options[:-1]) + " or " + options[-1]
    return {
        "train": "more chips, a smaller dpo.row_tokens or batch_size, or dpo.compute.remat: full",
        "reference": "a smaller dpo.compute.batch_size",
        "icr_score": "a smaller icr.score_batch_size",
        "prefill": "a smaller generation.prefill_tokens (prompt tokens one refill prefills) or fewer slots",
    }.get(program.split(":")[0], "fewer slots (the stage's batch_size) or a shorter max_new_tokens")


def refusal(report: dict) -> str | None:
    """One line for the first program that does not fit, with the compiler's numbers and what to change."""
    for topo in report["topologies"]:
        for row in topo["programs"]:
            if row["fits"]:
                continue
            what = row.get("advice") or advice(row["program"])
            if "reason" in row:
                return f"{row['program']} cannot run on {topo['topology']}: {row['reason']}"
            if "compiler" in row:
                return f"{row['program']} does not fit {topo['topology']}: {row['compiler']} Use {what}"
            if row.get("source") == "analytic":
                return (
                    f"{row['program']} does not fit {topo['topology']} (analytic plan): it needs "
                    f"{row['memory']['peak'] / GiB:.2f} GiB per GPU, a GPU has {topo['hbm_per_chip'] / GiB:.2f} GiB"
                )
            m = row["memory"]
            return (
                f"{row['program']} does not fit {topo['topology']}: the compiler needs {m['peak'] / GiB:.2f} GiB "
                f"per chip ({m['temporaries'] / GiB:.2f} GiB temporaries, {m['arguments'] / GiB:.2f} GiB "
                f"arguments), a chip has {topo['hbm_per_chip'] / GiB:.2f} GiB: use {what}"
            )
    return None


ABOUT = (
    "Compile every program of a run for TPU topologies (no TPU, weights or network needed) and report memory "
    "per chip, collectives, the compiler's cost estimate and compile time."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lidr_jax.plan", description=ABOUT)
    p.add_argument("--config", help="the run's YAML config (default: the packaged default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument(
        "--topology",
        action="append",
        required=True,
        help="a TPU topology as JAX names it (v5e:2x4, v5p:2x2x1) or a slice name (v5e-8, v5litepod-16, v5p-8, "
        "v4-32, v6e-8); or a GPU node, planned analytically (h100-8, h200-8, a100-8); repeat for several",
    )
    p.add_argument("--json", help="write the report here as JSON too")
    p.add_argument("--no-cost", action="store_true", help="skip the cost estimate (memory and collectives only)")
    p.add_argument(
        "--only",
        default="",
        help="compile only these programs, comma-separated: train, reference, prefill, decode (every stage), "
        "prefill:STAGE, decode:STAGE, icr_score",
    )
    p.add_argument("--traceback", action="store_true", help="show a compile error's traceback")
    return p


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the plan's own line (the attention fallback's reason), not Python's file:line form."""
    print(f"note: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _note
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        topologies = [gpu_node(name) or parse(name) for name in args.topology]
        run = load_run_config(args.config, args.set)
        config = model_architecture(run.model, run.dtype)
    except (TopologyError, SettingsError, PlanInputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"config": args.config or "default", "model": run.model, "topologies": []}
    done: dict = {}  # programs compiled so far, shared by the topologies
    try:
        for topo in topologies:
            if isinstance(topo, GPUNode):
                report["topologies"].append(plan_gpu(run, config, topo))
            else:
                only = tuple(name for name in args.only.split(",") if name)
                report["topologies"].append(plan_topology(run, config, topo, not args.no_cost, only=only, done=done))
    except (DoesNotFitOrCompile, TopologyError) as e:
        if args.traceback:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    line = refusal(report)
    if line:
        print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------- the fit check at load


def available_ram() -> int | None:
    """The memory the machine can still give (MemAvailable), or None where /proc/meminfo does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits_at_load(run, mesh, ram: int | None = None) -> dict | None:
    """The fit check at config load, before any model work (lidr_jax.pipeline.runner.open_run).

    First the analytic plan (lidr_jax.train.memory.check_model_fits: shapes only, where the devices report
    their memory). Then, where a compiler can answer, its numbers: the run's DPO step at the config's
    limits compiled ahead of time for the run's own mesh, its peak (`memory_analysis`) against the memory
    of one device (TPU, GPU), or on a CPU against the machine's available RAM (`ram`, default
    MemAvailable) when the analytic plan needs more than a quarter of it (a small run does not pay for
    the compile). Raises DoesNotFitError with the compiler's numbers; returns the compiled memory figures,
    or None when nothing was compiled."""
    if run.dpo.row_tokens == "auto" or run.dpo.compute.remat == "auto":
        return None  # chosen from the compiled step's memory when training starts, and refused there
    analytic = check_model_fits(run.model, run.dpo, mesh)
    # one of this process's devices: only those report their memory (every device of a mesh is alike)
    device = next(d for d in mesh.devices.flat if getattr(d, "process_index", 0) == jax.process_index())
    if not isinstance(device, jax.Device):
        return None  # a mesh description without devices (tests of the analytic check)
    limit = device_memory(device)
    if limit is None and device.platform == "cpu":
        ram = ram if ram is not None else agree_min(available_ram())  # one choice for every process
        shape = tuple(int(mesh.shape.get(a, 1)) for a in ("data", "fsdp", "tensor"))
        config = model_architecture(run.model, run.dtype)
        needed = analytic.total if analytic else plan_memory(config, run.dpo, shape).total
        if ram is None or needed * 4 < ram:
            return None
        limit = ram
    if limit is None:
        return None
    config = model_architecture(run.model, run.dtype)
    rules = parse_rules(run.mesh.rules)
    program = train_programs(run, mesh, rules)[0]
    where = f"{mesh.devices.size} {device.platform} device(s) ({describe_mesh(mesh)})"
    try:
        compiled, _ = _compile(program, config, platform=device.platform)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "RESOURCE_EXHAUSTED" in first or "Ran out of memory" in first:
            raise DoesNotFitError(
                f"DPO training does not fit {where}: {first} Use {advice('train', planned_dpo(run.dpo))}"
            ) from None
        raise
    mem = compiled_memory(compiled)
    peak = mem["peak"]
    if peak > limit:
        raise DoesNotFitError(
            f"DPO training needs {peak / GiB:.2f} GiB per device on {where} (the compiled step: "
            f"{mem['temporaries'] / GiB:.2f} GiB temporaries, {mem['arguments'] / GiB:.2f} GiB "
            f"arguments), but each has {limit / GiB:.2f} GiB: use {advice('train', planned_dpo(run.dpo))}"
        )
    return {"peak": int(peak), "limit": int(limit)}
