"""DPO training: the reference log-prob pass, the optimizer, one jitted train step, the loop.

Phases of a run (each a plain function, no trainer class):
1. `reference_logprobs`: sequence log-probs of every pair under the reference weights, once, stored
   beside the pairs (`save_reference` / `load_reference`), so training holds only the policy.
2. `make_optimizer`: AdamW after global-norm clipping, warmup then cosine/linear decay.
3. `make_train_step`: one jitted step over `grad_accum` micro-batches (a `lax.scan`), state donated.
4. `train`: plain Python loop with a progress bar (lidr_jax.progress); metrics every step to a
   `MetricsSink` (JSONL, and live TensorBoard / W&B scalars: lidr_jax.train.metrics).

Several processes (lidr_jax.parallel.multihost): every process builds the same host batch (same pairs, same
(seed, step) order) and hands the global mesh only the rows its own devices hold (`put_process_rows`).

Resuming: `TrainState` (params, opt_state, step) is the whole training state. The data position is a
function of `step` alone (`step_indices`: epoch order is seeded by (seed, epoch)), so a checkpoint of
`TrainState` resumes exactly; `train(..., state=restored, callback=save_fn)` is all a checkpointer needs.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lidr_jax.files import as_path, atomic_write_bytes
from lidr_jax.model.llama import param_specs
from lidr_jax.model.scoring import AnswerRows, batch_logprobs, bucket_length, score_answers, scoring_pass
from lidr_jax.parallel.multihost import put_process_rows
from lidr_jax.parallel.sharding import batch_split, place, rows_for, train_state_shardings
from lidr_jax.progress import progress as progress_bar
from lidr_jax.train.dpo import DPOConfig, dpo_terms
from lidr_jax.train.metrics import MetricsConfig, MetricsSink
from lidr_jax.train.packing import PackPlan, packed_logprobs, packed_step_batch, pair_tokens, plan_packing, step_plan
from lidr_jax.train.pairs import EncodedPairs, epoch_order, pair_batch


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree: checkpoint it as it is)."""

    params: Any  # float32 master weights
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf. `.state` is the last good state (the bad update
    was not applied); the caller keeps its last checkpoint and should lower the learning rate or
    switch compute.compute_dtype to float32."""

    def __init__(self, message: str, state: TrainState, metrics: dict[str, float]):
        super().__init__(message)
        self.state, self.metrics = state, metrics


# ---------------------------------------------------------------------------------- reference pass


def reference_logprobs(params, model_config, enc: EncodedPairs, cfg: DPOConfig, progress: bool = True):
    """Summed response log-probs of every pair under `params`: {"chosen": [N], "rejected": [N]}.

    A scoring pass (lidr_jax.model.scoring.score_answers) with `cfg.compute`: pairs sorted by length,
    `compute.batch_size` at a time, so each batch pads little; lengths bucketed (one compile per bucket).
    With `row_tokens` each batch is packed as training packs a step (several pairs per row, its own
    bucketed shape: `step_plan`), else one row per pair, the prompt run once for both answers.
    """
    compute = cfg.compute
    if not cfg.row_tokens:
        chosen, rejected = score_answers(
            params,
            model_config,
            AnswerRows(enc.prompt_ids, enc.chosen_ids, enc.rejected_ids),
            compute,
            bucket_multiple=cfg.bucket_multiple,
            progress=progress,
            desc="reference log-probs",
        )
        return {"chosen": chosen, "rejected": rejected}
    config = compute.model_config(model_config)
    impl = compute.attention_impl(shared_prompt=cfg.share_prompt)

    def make_batch(idx):
        # row_tokens auto: one row for the batch's pairs (no backward pass: one layer's activations live)
        row = cfg.row_tokens if cfg.row_tokens != "auto" else int(pair_tokens(enc, cfg.share_prompt)[idx].sum())
        plan = step_plan(enc, idx, row, 1, cfg.share_prompt, impl == "xla", cfg.bucket_multiple)
        batch = {k: v[0] for k, v in packed_step_batch(enc, None, idx, 1, 0, plan).items()}
        return batch, batch.pop("pair").reshape(-1)

    def logprobs(p, b):
        return packed_logprobs(p, b, config, chunk=compute.logprob_chunk, attention=impl)[:2]

    chosen, rejected = scoring_pass(
        params, enc.lengths(), make_batch, logprobs, compute.batch_size, progress=progress, desc="reference log-probs"
    )
    return {"chosen": chosen, "rejected": rejected}


def save_reference(path: str | os.PathLike, ref: dict[str, np.ndarray], enc: EncodedPairs):
    """Reference log-probs as .npz with the pairs' token fingerprint (written atomically)."""
    buffer = io.BytesIO()
    np.savez(buffer, chosen=ref["chosen"], rejected=ref["rejected"], fingerprint=np.array(enc.fingerprint()))
    atomic_write_bytes(path, buffer.getvalue())


def load_reference(path: str | os.PathLike, enc: EncodedPairs) -> dict[str, np.ndarray]:
    """Stored reference log-probs, checked against the pairs they were computed for."""
    with np.load(io.BytesIO(as_path(path).read_bytes())) as z:  # local or gs:// (lidr_jax.files.as_path)
        ref = {"chosen": z["chosen"], "rejected": z["rejected"]}
        fingerprint = str(z["fingerprint"])
    if fingerprint != enc.fingerprint() or len(ref["chosen"]) != len(enc):
        raise ValueError(
            f"{path} holds reference log-probs of other pairs (or other tokenization/limits); delete it to recompute"
        )
    return ref


# --------------------------------------------------------------------------------------- optimizer


def total_steps(num_pairs: int, cfg: DPOConfig) -> int:
    return cfg.epochs * steps_per_epoch(num_pairs, cfg)


def steps_per_epoch(num_pairs: int, cfg: DPOConfig) -> int:
    return -(-num_pairs // (cfg.batch_size * cfg.grad_accum))


def lr_schedule(cfg: DPOConfig, num_steps: int) -> Callable:
    """Learning rate per step, as transformers' schedules: linear warmup from 0, then cosine or
    linear decay to 0 at `num_steps` (or constant)."""
    warm = int(round(cfg.warmup * num_steps)) if cfg.warmup < 1 else int(cfg.warmup)
    lr = cfg.learning_rate

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((s - warm) / max(1, num_steps - warm), 0.0, 1.0)
        decay = {
            "cosine": 0.5 * (1 + jnp.cos(jnp.pi * progress)),
            "linear": 1 - progress,
            "constant": jnp.ones_like(progress),
        }[cfg.schedule]
        return lr * jnp.where(s < warm, s / max(1, warm), decay)

    return schedule


def make_optimizer(cfg: DPOConfig, num_steps: int):
    """Global-norm clipping then AdamW (state in float32, like the master weights)."""
    adamw = optax.adamw(
        lr_schedule(cfg, num_steps), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw


def init_state(params, optimizer) -> TrainState:
    """A fresh state with float32 master weights. The weights are copied (a jitted cast keeps their
    sharding): the train step donates its state, and the caller's arrays must survive it."""
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p))(params)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------- step


def accumulated_grads(params, batch, model_config, cfg: DPOConfig):
    """Gradients and metrics of the weighted mean loss over `batch` leaves [A, ...] (A micro-batches
    of b packed pair rows, lidr_jax.train.pairs.pair_batch). Sums are accumulated and divided once by the
    total pair weight, so any split of the same pairs into micro-batches gives the same gradients."""
    compute = cfg.compute
    config = compute.model_config(model_config)

    def micro_loss(p, mb):
        if cfg.row_tokens:  # several pairs per row (lidr_jax.train.packing): per-pair values [R * P]
            impl = compute.attention_impl(shared_prompt=cfg.share_prompt)
            logp_c, logp_r, count_c, count_r = packed_logprobs(
                p, mb, config, chunk=compute.logprob_chunk, remat=compute.remat, attention=impl
            )
            mb = {k: mb[k].reshape(-1) for k in ("weight", "ref_chosen", "ref_rejected")}
        else:
            logp_c, logp_r, count_c = batch_logprobs(p, mb, config, compute)
            count_r = jnp.sum(mb["rejected_mask"], axis=-1).astype(jnp.float32)  # averaged IPO
        loss_B, per_pair = dpo_terms(logp_c, logp_r, count_c, mb["ref_chosen"], mb["ref_rejected"], cfg, count_r)
        w = mb["weight"]
        sums = {k: jnp.sum(w * v) for k, v in per_pair.items()}
        sums["weight"] = jnp.sum(w)
        return jnp.sum(w * loss_B), sums

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def body(carry, mb):
        g_acc, s_acc = carry
        g, s = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

    first = jax.tree.map(lambda x: x[0], batch)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first))
    (g_sum, sums), _ = jax.lax.scan(body, zeros, batch)
    total = jnp.maximum(sums.pop("weight"), 1e-9)
    grads = jax.tree.map(lambda g: g / total, g_sum)
    return grads, {k: v / total for k, v in sums.items()}


def make_train_step(model_config, cfg: DPOConfig, optimizer, schedule, state_shardings=None):
    """`step(state, batch) -> (state, metrics)`, jitted with the state donated. A non-finite loss or
    gradient norm leaves the state unchanged (metrics report it; the loop raises). `state_shardings`
    (lidr_jax.parallel.sharding.train_state_shardings) pins the state's in/out shardings on a mesh."""

    def step(state: TrainState, batch):
        grads, metrics = accumulated_grads(state.params, batch, model_config, cfg)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def keep(new, old):  # the old values wherever the step was not finite
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        new_state = TrainState(
            keep(params, state.params), keep(opt_state, state.opt_state), state.step + ok.astype(jnp.int32)
        )
        metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(state.step)}
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None))


# ------------------------------------------------------------------------------------------- loop


def step_indices(step: int, num_pairs: int, cfg: DPOConfig) -> np.ndarray:
    """The pair indices of optimizer step `step` (a function of the step alone: resumable)."""
    per_step = cfg.batch_size * cfg.grad_accum
    spe = steps_per_epoch(num_pairs, cfg)
    order = epoch_order(num_pairs, cfg.seed, step // spe)
    pos = step % spe
    return order[pos * per_step : (pos + 1) * per_step]


def pack_plan(enc: EncodedPairs, cfg: DPOConfig) -> PackPlan:
    """The largest packed shape of a run with `row_tokens`: every step's pairs fit it (with `pack_shapes:
    run` every step has it: one compilation; with `step` no step is larger). Block tables of
    lidr_jax.train.packing.block_attention where the training pass attends with xla."""
    steps = (step_indices(k, len(enc), cfg) for k in range(total_steps(len(enc), cfg)))
    blocks = cfg.compute.attention_impl(shared_prompt=cfg.share_prompt) == "xla"
    return plan_packing(enc, steps, cfg.row_tokens, cfg.grad_accum, cfg.share_prompt, blocks)


def step_pack_plan(enc: EncodedPairs, idx: np.ndarray, cfg: DPOConfig, plan: PackPlan | None = None) -> PackPlan:
    """The packed shape of the step of pairs `idx`: the run's `plan` (default `pack_plan`) or, with
    `pack_shapes: step`, the step's own (lidr_jax.train.packing.step_plan)."""
    if cfg.pack_shapes == "run":
        return plan or pack_plan(enc, cfg)
    blocks = cfg.compute.attention_impl(shared_prompt=cfg.share_prompt) == "xla"
    return step_plan(enc, idx, cfg.row_tokens, cfg.grad_accum, cfg.share_prompt, blocks, cfg.bucket_multiple)


def micro_batch_rows(cfg: DPOConfig, split: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) of unpacked rows on a mesh that splits rows `split`
    ways. A micro-batch of `batch_size` rows when `split` divides it; else at least `split` rows (a
    multiple of it) and fewer micro-batches, so every device gets a share: a count the mesh cannot split
    would be whole on every device (the divisibility fallback), each computing every row (4 rows on a
    v5e-16: 16 times the work and the activations). The step's pairs (`batch_size x grad_accum`,
    `step_indices`) and its gradients do not change (sums divided once by the pair weight); rows past
    them are filler of weight 0."""
    if cfg.batch_size % split == 0:
        return cfg.batch_size, cfg.grad_accum
    b = rows_for(cfg.batch_size, split)
    return b, -(-(cfg.batch_size * cfg.grad_accum) // b)


def step_batch(
    enc: EncodedPairs,
    ref,
    idx: np.ndarray,
    cfg: DPOConfig,
    pad_id: int,
    length: int | None = None,
    plan: PackPlan | None = None,
    split: int | None = None,
):
    """Stacked micro-batches [A, b, ...] for one optimizer step; all share one bucketed T. Micro-batches
    past the end of a short last step are filler with weight 0. With `row_tokens`, packed rows
    [A, R, T] of the run's `plan` (default: `pack_plan`) or the step's own (`step_pack_plan`).
    `split`: the ways the mesh splits rows (default: the active mesh's, `sharding.batch_split`); see
    `micro_batch_rows`."""
    split = batch_split() if split is None else split
    if cfg.row_tokens:  # packed: rows padded (empty, weight 0) to a multiple of the split, for the same reason
        plan = step_pack_plan(enc, idx, cfg, plan)
        plan = plan if plan.rows % split == 0 else dataclasses.replace(plan, rows=rows_for(plan.rows, split))
        return packed_step_batch(enc, ref, idx, cfg.grad_accum, pad_id, plan)
    b, accum = micro_batch_rows(cfg, split)
    if length is None:
        length = bucket_length(int(enc.lengths()[idx].max()), cfg.bucket_multiple)
    entries = bucket_length(int(enc.answer_lengths()[idx].max()), cfg.bucket_multiple)
    micro = []
    for j in range(accum):
        part = idx[j * b : (j + 1) * b]
        mb = pair_batch(enc, part if len(part) else idx[:1], pad_id, batch_size=b, length=length, entries=entries)
        if not len(part):
            mb["weight"][:] = 0.0
        fill = np.concatenate([part, np.full(b - len(part), idx[0])]).astype(np.int64)
        mb["ref_chosen"], mb["ref_rejected"] = ref["chosen"][fill], ref["rejected"][fill]
        micro.append(mb)
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def train(
    params,
    model_config,
    enc: EncodedPairs,
    ref: dict[str, np.ndarray],
    cfg: DPOConfig,
    *,
    state: TrainState | None = None,
    callback: Callable[[TrainState, dict[str, float]], None] | None = None,
    metrics_path: str | os.PathLike | None = None,
    sink: MetricsSink | None = None,
    pad_id: int = 0,
    progress: bool = True,
    choice=None,
) -> TrainState:
    """Train the policy `params` with DPO on the encoded pairs and their reference log-probs.

    `state`: resume from this TrainState (its step picks the data position). `callback(state,
    metrics)` runs after every step (save a checkpoint there; the state's buffers are donated to the
    next step, so finish writing before returning). Every step's metrics go to `sink` (the caller
    opens and closes it), or, without a sink, are appended to `metrics_path` (JSONL), one line per step.
    Raises `NonFiniteLossError` (holding the last good state) on NaN/inf; that step is logged first.
    `choice`: the auto choice that made `cfg` concrete (lidr_jax.train.autotune), written with the first
    step's metrics.
    """
    if len(ref["chosen"]) != len(enc):
        raise ValueError(f"{len(ref['chosen'])} reference log-probs for {len(enc)} pairs")
    if cfg.row_tokens == "auto" or cfg.compute.remat == "auto":
        raise ValueError(
            "dpo.row_tokens / dpo.compute.remat auto are chosen before training: lidr_jax.train.autotune.choose_if_auto"
        )
    num_steps = total_steps(len(enc), cfg)
    optimizer = make_optimizer(cfg, num_steps)
    schedule = lr_schedule(cfg, num_steps)
    if state is None:
        state = init_state(params, optimizer)
    # None unless a mesh is active (sharding.use_mesh)
    shardings = train_state_shardings(state, param_specs(model_config))
    state = state if shardings is None else place(state, shardings)
    step_fn = make_train_step(model_config, cfg, optimizer, schedule, state_shardings=shardings)
    start = int(state.step)
    spe = steps_per_epoch(len(enc), cfg)
    plan = pack_plan(enc, cfg) if cfg.row_tokens and cfg.pack_shapes == "run" else None
    epoch_tokens = epoch_slots = 0  # padding share of the epoch so far (this process's steps)
    own_sink = sink is None and metrics_path is not None
    if own_sink:
        sink = MetricsSink(MetricsConfig(report_to=()), jsonl_path=metrics_path)
    bar = progress_bar(num_steps, "DPO", "step", initial=start, enabled=progress)
    try:
        for k in range(start, num_steps):
            idx = step_indices(k, len(enc), cfg)
            batch = step_batch(enc, ref, idx, cfg, pad_id, plan=plan)
            real = batch["attention_mask"].sum(-1)  # prompt counted once; filler rows (weight 0) are padding
            tokens = int(real.sum() if cfg.row_tokens else (real * batch["weight"]).sum())
            epoch_tokens, epoch_slots = epoch_tokens + tokens, epoch_slots + batch["attention_mask"].size
            t0 = time.perf_counter()
            state, metrics = step_fn(state, put_process_rows(batch, axis=1))
            metrics = {name: float(v) for name, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            metrics.update(
                step=k + 1,
                epoch=k // spe,
                pairs=len(idx),
                tokens=tokens,
                step_time_s=dt,
                tokens_per_s=tokens / dt,
                pairs_per_s=len(idx) / dt,
                padding_share=1 - tokens / batch["attention_mask"].size,
            )
            if choice is not None and k == start:  # the auto choice, in the run's metrics once
                metrics.update(choice.metrics())
            if (k + 1) % spe == 0 or k + 1 == num_steps:  # an epoch's last step
                metrics["epoch_padding_share"] = 1 - epoch_tokens / epoch_slots
                epoch_tokens = epoch_slots = 0
            if sink is not None:
                sink.log(metrics, step=k + 1)
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise NonFiniteLossError(
                    f"step {k + 1}: loss={metrics['loss']} grad_norm={metrics['grad_norm']} is not finite; "
                    f"the update was not applied and training stopped. Resume from the last good "
                    f"checkpoint with a lower learning_rate (now {cfg.learning_rate}) or "
                    "dpo.compute.compute_dtype=float32.",
                    state,
                    metrics,
                )
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                acc=f"{metrics['rewards/accuracies']:.2f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
            )
            bar.update(1)
            if callback is not None:
                callback(state, metrics)
    finally:
        bar.close()
        if own_sink:
            sink.close()
    return state


def train_checkpointed(
    model,
    enc: EncodedPairs,
    ref: dict[str, np.ndarray],
    cfg: DPOConfig,
    ckpt,
    *,
    state: TrainState | None,
    sink: MetricsSink,
    after_save: Callable[[int], None] = lambda step: None,
    progress: bool = True,
    choice=None,
) -> TrainState:
    """`train` a loaded model with Orbax checkpoints: `ckpt` (a `TrainCheckpointer`) saves every
    `ckpt.every` steps, `after_save(step)` runs once a save is on disk, and the final state is saved
    whatever the step. `sink` is opened and closed here. The pipeline's train stage and the DPO command
    both train this way, so a killed run of either resumes the same."""

    def save(st: TrainState, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        if ckpt.save(step, st, data_position={"step": step}):
            ckpt.wait()
            after_save(step)

    with sink:
        state = train(
            model.params,
            model.config,
            enc,
            ref,
            cfg,
            state=state,
            callback=save,
            sink=sink,
            pad_id=model.tokenizer.pad_token_id,
            progress=progress,
            choice=choice,
        )
    ckpt.save(int(state.step), state, data_position={"step": int(state.step)}, force=True)
    return state
