"""Rows and recomputation chosen from the compiled train step's memory (`dpo.row_tokens: auto`,
`dpo.compute.remat: auto`).

Candidates. A packing is (micro-batches per optimizer step A, a divisor of the step's pairs; rows of R
tokens, the largest step's tokens over A but at least the longest pair, rounded up to 128): A = 1 packs
a step into as few rows as its pairs allow, larger A splits it into micro-batches that each hold less.
Each packing is paired with each recomputation policy of the layer scan, least recomputation first:
none, names (lidr_jax.model.llama.REMAT_POLICIES: keeps q, k, v, the attention output, the residual
stream and the MLP's two input products), dots, full. A setting given explicitly (row_tokens a number,
remat a policy) is kept.

Cost. Every candidate's train step (lidr_jax.train.trainer.make_train_step) is lowered at the largest
micro-batch shape of the run's steps; its cost is XLA's FLOP count of that program per token slot (XLA
counts a loop body once, so this is one layer's forward, backward and recomputation, the head and the
optimizer) times the token slots of the epoch, padding included. Deterministic for fixed pairs.

Memory. Candidates are compiled in order of cost and the first whose compiled peak fits the budget is
taken: `memory_analysis()` of the compiled step, arguments + outputs − donated (aliased) + temporaries.
Budget: the device's memory limit (lidr_jax.train.memory.device_memory), or on CPU MemAvailable of
/proc/meminfo when the choice is made (on several hosts the least of them, so every process compiles the
same step), less `dpo.memory_margin_gib`. The weights already loaded count
again among the arguments, so on CPU the check errs on the safe side by their size.

Pairs longer than any row that fits (rows of the longest pair do not fit even one per micro-batch with
full recomputation) are dropped before training and counted (`Choice.dropped`); when not even the
shortest rows fit, `DoesNotFitError` is raised before training, with the numbers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from lidr_jax.parallel.multihost import agree_min
from lidr_jax.parallel.sharding import tree_nbytes
from lidr_jax.train import trainer
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.memory import DoesNotFitError, compiled_memory, device_memory, size
from lidr_jax.train.packing import BLOCK, pair_tokens
from lidr_jax.train.pairs import EncodedPairs
from lidr_jax.train.trainer import (
    init_state,
    lr_schedule,
    make_optimizer,
    make_train_step,
    pack_plan,
    step_batch,
    step_indices,
    step_pack_plan,
    steps_per_epoch,
)

POLICIES = ("none", "names", "dots", "full")  # least recomputation (and most memory) first
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Candidate:
    row_tokens: int
    grad_accum: int
    remat: str
    rows: int = 0  # rows per micro-batch at the largest step
    tokens: int = 0  # T of the largest step's rows
    flops: float = 0.0  # XLA's FLOP count of the largest step's program (loop bodies once)
    epoch_slots: int = 0  # token slots of one pass over the run's steps, padding included
    peak: int | None = None  # compiled peak bytes (None: not compiled)

    @property
    def cost(self) -> float:
        return self.flops / max(1, self.rows * self.tokens) * self.epoch_slots  # flops: one micro-batch

    def describe(self) -> str:
        peak = "not compiled" if self.peak is None else f"peak {size(self.peak)}"
        return (
            f"rows of {self.row_tokens} tokens ({self.rows} x {self.tokens} per micro-batch at the largest step), "
            f"{self.grad_accum} micro-batch(es) per step, remat {self.remat}: cost {self.cost / 1e12:.2f} TFLOP, {peak}"
        )


@dataclasses.dataclass(frozen=True)
class Choice:
    """What `choose` picked, and why (`describe` prints it; `metrics` goes into the run's metrics)."""

    chosen: Candidate
    budget: int
    memory: str  # where the budget came from
    tried: tuple[Candidate, ...]  # every candidate, in order of cost (compiled ones carry their peak)
    dropped: int = 0  # pairs longer than any row that fits

    def describe(self) -> str:
        c = self.chosen
        compiled = sum(t.peak is not None for t in self.tried)
        return (
            f"auto packing and remat: {c.describe()}; budget {size(self.budget)} ({self.memory}); "
            f"{len(self.tried)} candidates lowered, {compiled} compiled; {self.dropped} pairs dropped (longer "
            f"than any row that fits)"
        )

    def metrics(self) -> dict:
        c = self.chosen
        return {
            "autotune/row_tokens": c.row_tokens,
            "autotune/grad_accum": c.grad_accum,
            "autotune/rows": c.rows,
            "autotune/remat": c.remat,
            "autotune/peak_bytes": c.peak,
            "autotune/budget_bytes": self.budget,
            "autotune/cost_tflop": c.cost / 1e12,
            "autotune/dropped_pairs": self.dropped,
        }


def is_auto(cfg: DPOConfig) -> bool:
    return cfg.row_tokens == AUTO or cfg.compute.remat == AUTO


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        return int(next(x for x in lines if x.startswith("MemAvailable:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def memory_budget(cfg: DPOConfig, device=None) -> tuple[int, str]:
    """(bytes the train step may use, where the figure came from): the device's memory limit, or on CPU
    the machine's available RAM, less `cfg.memory_margin_gib`. ValueError (one line) where neither exists."""
    device = device or jax.local_devices()[0]
    limit, source = device_memory(device), f"{getattr(device, 'device_kind', device.platform)} memory limit"
    if limit is None and device.platform == "cpu":
        # every process must choose the same program: the least any host has (one host: its own)
        limit, source = agree_min(mem_available()), "RAM available now"
    if limit is None:
        raise ValueError(
            "dpo.row_tokens / dpo.compute.remat auto choose from the device's memory, but this device reports "
            "none and no RAM figure was found: set dpo.row_tokens (e.g. 4096) and dpo.compute.remat explicitly"
        )
    margin = int(cfg.memory_margin_gib * 2**30)
    return limit - margin, f"{source} {size(limit)} less a {size(margin)} margin"


def _divisors(n: int) -> list[int]:
    return [a for a in range(1, n + 1) if n % a == 0]


def _steps(enc: EncodedPairs, cfg: DPOConfig) -> list[np.ndarray]:

    return [step_indices(k, len(enc), cfg) for k in range(steps_per_epoch(len(enc), cfg))]


def concrete(cfg: DPOConfig, row_tokens: int, grad_accum: int, remat: str) -> DPOConfig:
    """`cfg` with a packing and a policy in place of auto (the step's pairs unchanged). The log-softmax
    chunk stays `cfg`'s: XLA counts a loop body once, so FLOP counts of different chunkings do not compare."""
    per_step = cfg.batch_size * cfg.grad_accum
    compute = cfg.compute.replace(remat=remat)
    return cfg.replace(row_tokens=row_tokens, batch_size=per_step // grad_accum, grad_accum=grad_accum, compute=compute)


def packings(enc: EncodedPairs, cfg: DPOConfig, cap: int | None = None) -> list[tuple[int, int]]:
    """(row_tokens, grad_accum) candidates for the run's pairs (module docstring); `cap`: no row longer."""
    if cfg.row_tokens != AUTO:
        return [(cfg.row_tokens, cfg.grad_accum)]
    lengths = pair_tokens(enc, cfg.share_prompt)
    largest = max(int(lengths[idx].sum()) for idx in _steps(enc, cfg))
    longest = int(lengths.max())
    out = []
    for a in _divisors(cfg.batch_size * cfg.grad_accum):
        row = -(-max(longest, -(-largest // a)) // BLOCK) * BLOCK
        row = min(row, cap) if cap else row
        if (row, a) not in out:
            out.append((row, a))
    return out


def _largest_batch(enc: EncodedPairs, cfg: DPOConfig, pad_id: int):
    """(the largest step's stacked micro-batches, rows, T, the epoch's token slots) under `cfg`."""

    plan = pack_plan(enc, cfg) if cfg.pack_shapes == "run" else None
    best, slots = None, 0
    for idx in _steps(enc, cfg):
        p = step_pack_plan(enc, idx, cfg, plan)
        n = cfg.grad_accum * p.rows * p.row_tokens
        slots += n
        if best is None or n > best[0]:
            best = (n, idx, p)
    _, idx, p = best

    ref = {"chosen": np.zeros(len(enc), np.float32), "rejected": np.zeros(len(enc), np.float32)}
    return step_batch(enc, ref, idx, cfg, pad_id, plan=plan), p.rows, p.row_tokens, slots


def _abstract_state(params_abstract, cfg: DPOConfig):

    optimizer = make_optimizer(cfg, 100)
    return jax.eval_shape(lambda p: init_state(p, optimizer), params_abstract)


def state_bytes(params_abstract, cfg: DPOConfig) -> int:
    """Bytes of the train state (float32 weights and AdamW moments), from shapes: a floor under any
    candidate's peak, so a budget below it is refused without compiling anything."""
    return tree_nbytes(_abstract_state(params_abstract, cfg))


class _Program:
    """A candidate's train step at a batch shape, lowered and compiled at most once per process (keyed by
    what the program depends on: the model, the settings with the row length reduced to packed or not,
    the batch's shapes and the weights' shapes)."""

    _memo: dict = {}

    def __init__(self, model_config, params_abstract, cfg: DPOConfig, batch):
        shapes = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        weights = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(params_abstract))
        self.key = (model_config, cfg.replace(row_tokens=16 if cfg.row_tokens else 0, batch_size=1), shapes, weights)
        self.args = model_config, params_abstract, cfg, batch
        self._lowered = None

    def _entry(self) -> dict:
        return self._memo.setdefault(self.key, {})

    def lowered(self):
        if self._lowered is None:
            model_config, params_abstract, cfg, batch = self.args
            step = make_train_step(model_config, cfg, make_optimizer(cfg, 100), lr_schedule(cfg, 100))
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
            self._lowered = step.lower(_abstract_state(params_abstract, cfg), abstract)
        return self._lowered

    def flops(self) -> float:
        entry = self._entry()
        if "flops" not in entry:
            entry["flops"] = float(self.lowered().cost_analysis()["flops"])
        return entry["flops"]

    def peak(self) -> int:
        entry = self._entry()
        if "peak" not in entry:
            entry["peak"] = compiled_peak(self.lowered())
            self._lowered = None  # the compiled program is not kept
        return entry["peak"]


def compiled_peak(lowered) -> int:
    """Peak bytes of a lowered program once compiled: arguments + outputs − aliased + temporaries."""
    return compiled_memory(lowered.compile())["peak"]


def _candidates(model_config, params_abstract, enc, cfg, pad_id, cap=None) -> list[tuple[Candidate, object]]:
    policies = POLICIES if cfg.compute.remat == AUTO else (cfg.compute.remat,)
    out = []
    for row, accum in packings(enc, cfg, cap):
        c = concrete(cfg, row, accum, policies[0])
        batch, rows, T, slots = _largest_batch(enc, c, pad_id)
        for remat in policies:
            program = _Program(model_config, params_abstract, concrete(cfg, row, accum, remat), batch)
            out.append((Candidate(row, accum, remat, rows, T, program.flops(), slots), program))
    # cheapest first; ties: fewer micro-batches, then less recomputation (the listing order)
    return sorted(out, key=lambda x: x[0].cost)


def _keep(enc: EncodedPairs, ref, keep: np.ndarray):
    pick = np.flatnonzero(keep)
    sub = EncodedPairs(
        [enc.prompt_ids[i] for i in pick],
        [enc.chosen_ids[i] for i in pick],
        [enc.rejected_ids[i] for i in pick],
        enc.truncated_prompts,
        enc.truncated_responses,
        enc.truncated_to_row,
    )
    return sub, None if ref is None else {k: np.asarray(v)[pick] for k, v in ref.items()}


def choose(
    model_config,
    params,
    enc: EncodedPairs,
    cfg: DPOConfig,
    *,
    ref=None,
    budget: tuple[int, str] | None = None,
    pad_id: int = 0,
):
    """(the concrete DPOConfig, the pairs and reference log-probs kept, `Choice`) for a config with
    `row_tokens` or `compute.remat` auto (module docstring). `params`: the weights or their shapes;
    `budget`: (bytes, source), default `memory_budget(cfg)`. Raises DoesNotFitError before training when
    nothing fits, ValueError when there is no memory figure."""
    limit, source = budget or memory_budget(cfg)
    params_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    floor = state_bytes(params_abstract, cfg)
    if floor > limit:
        raise DoesNotFitError(
            f"DPO training does not fit: the weights and AdamW state alone take {size(floor)}, more than the "
            f"budget {size(limit)} ({source}); free memory, lower dpo.memory_margin_gib or use a smaller model"
        )
    tried: list[Candidate] = []
    cands = _candidates(model_config, params_abstract, enc, cfg, pad_id)
    for i, (cand, program) in enumerate(cands):
        cand = dataclasses.replace(cand, peak=program.peak())
        tried.append(cand)
        if cand.peak <= limit:
            rest = [c for c, _ in cands[i + 1 :]]
            choice = Choice(cand, limit, source, tuple(tried + rest))
            return concrete(cfg, cand.row_tokens, cand.grad_accum, cand.remat), enc, ref, choice
    # Nothing holds the longest pair: shorter rows (halving, one per micro-batch, the last policy)
    # for the pairs that fit them; the longer pairs are dropped and counted.
    if cfg.row_tokens != AUTO:
        _refuse(tried, limit, source)
    lengths = pair_tokens(enc, cfg.share_prompt)
    cap = -(-int(lengths.max()) // BLOCK) * BLOCK
    while cap > BLOCK:
        cap = max(BLOCK, -(-(cap // 2) // BLOCK) * BLOCK)
        keep = lengths <= cap
        if not keep.any():
            break
        sub, sub_ref = _keep(enc, ref, keep)
        last = concrete(
            cfg, cap, cfg.batch_size * cfg.grad_accum, POLICIES[-1] if cfg.compute.remat == AUTO else cfg.compute.remat
        )
        batch = _largest_batch(sub, last, pad_id)[0]
        peak = _Program(model_config, params_abstract, last, batch).peak()
        tried.append(Candidate(cap, last.grad_accum, last.compute.remat, peak=peak))
        if peak <= limit:
            new_cfg, sub, sub_ref, choice = choose(
                model_config, params, sub, cfg, ref=sub_ref, budget=(limit, source), pad_id=pad_id
            )
            dropped = len(enc) - len(sub)
            return (
                new_cfg,
                sub,
                sub_ref,
                dataclasses.replace(choice, dropped=dropped, tried=tuple(tried) + choice.tried),
            )
    _refuse(tried, limit, source)


def _refuse(tried: list[Candidate], limit: int, source: str):
    least = min(tried, key=lambda c: c.peak)
    raise DoesNotFitError(
        f"DPO training does not fit: the least memory of {len(tried)} packings and remat policies compiled is "
        f"{size(least.peak)} ({least.describe()}), more than the budget {size(limit)} ({source}); free memory, "
        f"lower dpo.memory_margin_gib, use dpo.compute.compute_dtype bfloat16 or shorter pairs"
    )


def choose_if_auto(model_config, params, enc: EncodedPairs, cfg: DPOConfig, *, ref, pad_id: int = 0):
    """(cfg, pairs, reference log-probs, choice) to train with: `choose`'s, printed once, when
    `row_tokens` or `compute.remat` is auto; else the inputs as they are and no choice."""
    if cfg.row_tokens != "auto" and cfg.compute.remat != "auto":
        return cfg, enc, ref, None
    cfg, enc, ref, choice = choose(model_config, params, enc, cfg, ref=ref, pad_id=pad_id)
    print(choice.describe(), flush=True)
    return cfg, enc, ref, choice


def train_checkpointed(model, enc: EncodedPairs, ref, cfg: DPOConfig, ckpt, *, state, **kwargs):
    """lidr_jax.train.trainer.train_checkpointed with `row_tokens` / `compute.remat` auto chosen first
    (`choose_if_auto`, from the weights being trained): the pipeline's train stage and the DPO command."""
    weights = model.params if state is None else state.params
    pad_id = model.tokenizer.pad_token_id
    cfg, enc, ref, choice = choose_if_auto(model.config, weights, enc, cfg, ref=ref, pad_id=pad_id)
    return trainer.train_checkpointed(model, enc, ref, cfg, ckpt, state=state, choice=choice, **kwargs)
