"""The training half of an iteration: reference log-probs -> DPO training -> checkpoint -> HF export.

The reference pass runs once with the iteration's starting weights and its result is stored beside
the pairs (`iter_K/reference/`), so training holds only the policy and its optimizer state (docs/design.md
rule 6). Training checkpoints every `checkpoint_every` steps with Orbax; a restarted run resumes
from the last checkpoint and, because the data order is a function of (seed, step), reaches the same
parameters as an uninterrupted run. Several processes: all compute, the run directory's writer
writes (metrics, reference log-probs, stats); Orbax checkpoints are written by all together.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import jax

from lidr_jax.files import AnyPath, is_local, read_jsonl, remove_tree, tree_bytes, upload_tree
from lidr_jax.formats.export import export_hf
from lidr_jax.formats.load import Model
from lidr_jax.model.llama import param_specs
from lidr_jax.parallel import sharding
from lidr_jax.pipeline.config import RunConfig
from lidr_jax.pipeline.export_run import card_info
from lidr_jax.pipeline.iteration import Iteration
from lidr_jax.pipeline.resumable import crash_point
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.train import autotune, trainer
from lidr_jax.train.checkpoint import TrainCheckpointer, save_params
from lidr_jax.train.cli import first_nonfinite
from lidr_jax.train.memory import check_training_fits
from lidr_jax.train.metrics import NO_METRICS, MetricsSink, truncate_metrics
from lidr_jax.train.pairs import encode_pairs, read_pairs


class TrainingDivergedError(RuntimeError):
    """Training met a non-finite loss; the message names the checkpoint kept and the setting to change."""


class MetricsFileError(ValueError):
    """A training metrics file is damaged other than by a kill (which can cut only its last line)."""


def _encoded(cfg: RunConfig, run: RunDir, k: int, model: Model):
    pairs = read_pairs(run.outputs(k, "pairs")["pairs"])
    return encode_pairs(pairs, model.tokenizer, cfg.dpo.max_prompt_len, cfg.dpo.max_response_len, cfg.dpo.row_tokens)


def reference_stage(it: Iteration) -> dict:
    """Summed response log-probs of every pair under the iteration's starting weights."""
    cfg, run, k, model = it.cfg, it.run, it.k, it.policy
    d = run.stage_dir(k, "reference")
    enc = _encoded(cfg, run, k, model)
    ref = trainer.reference_logprobs(model.params, model.config, enc, cfg.dpo)
    run.on_writer(trainer.save_reference, d / "reference_logprobs.npz", ref, enc)
    stats = {
        "pairs": len(enc),
        "truncated_prompts": enc.truncated_prompts,
        "truncated_responses": enc.truncated_responses,
    }
    run.write_json(d / "stats.json", stats)
    return {"reference": str(d / "reference_logprobs.npz"), "stats": stats}


def train_stage(it: Iteration) -> dict:
    """DPO + NLL from the iteration's starting policy; resumes from the last Orbax checkpoint."""
    cfg, run, k, model = it.cfg, it.run, it.k, it.policy
    d = run.stage_dir(k, "train")
    enc = _encoded(cfg, run, k, model)
    ref = trainer.load_reference(run.outputs(k, "reference")["reference"], enc)
    dpo = cfg.dpo_for(k)
    # refuse before training, with the numbers, what the devices cannot hold (auto rows and remat are chosen
    # from the compiled step's memory instead, and refused there: lidr_jax.train.autotune)
    if sharding.active() and not autotune.is_auto(dpo):
        rows = trainer.pack_plan(enc, dpo).rows if dpo.row_tokens else None
        check_training_fits(model.config, dpo, sharding.active().mesh, rows)
    num_steps = trainer.total_steps(len(enc), dpo)
    optimizer = trainer.make_optimizer(dpo, num_steps)
    abstract = jax.eval_shape(lambda p: trainer.init_state(p, optimizer), model.params)
    metrics_path = d / "metrics.jsonl"
    state = None
    with TrainCheckpointer(d / "checkpoints", every=cfg.checkpoint_every, keep=cfg.checkpoint_keep) as ckpt:
        ctx = sharding.active()  # restore straight onto the mesh: nothing whole on one device
        shardings = sharding.state_shardings(abstract, param_specs(model.config), ctx.mesh, ctx.rules) if ctx else None
        restored = ckpt.restore_latest(abstract, shardings)
        if restored is not None:
            state = restored[0]
            run.on_writer(_truncate_metrics, metrics_path, int(state.step))
            print(f"  train: resuming from the checkpoint at step {int(state.step)} of {num_steps}")
        else:  # a run killed before its first checkpoint starts over
            run.on_writer(metrics_path.unlink, missing_ok=True)

        sink = MetricsSink(  # JSONL, TensorBoard (and W&B when asked for) every step, while training runs
            cfg.metrics if run.writer else NO_METRICS,
            jsonl_path=metrics_path if run.writer else None,
            tensorboard_dir=run.path / "tensorboard" / f"iter_{k}",
            purge_step=(int(state.step) if state is not None else 0) + 1,
            run_name=str(run.path),
            run_config=run.config,
            wandb_prefix=f"iter_{k}/train",
        )
        try:
            state = autotune.train_checkpointed(
                model, enc, ref, dpo, ckpt, state=state, sink=sink, after_save=lambda step: crash_point(f"train:{step}")
            )
        except trainer.NonFiniteLossError as e:
            raise TrainingDivergedError(
                f"iteration {k}: {e}; the last good checkpoint is kept in {d / 'checkpoints'}; rerun with "
                f"e.g. --allow-config-change --set dpo.learning_rate={cfg.dpo.learning_rate / 10:g} to continue"
            ) from None
    bad = first_nonfinite(state.params)  # a finite loss at every step does not make the last update finite
    if bad is not None:
        raise TrainingDivergedError(
            f"iteration {k}: the trained weights are not finite ({bad} holds NaN or inf) although every loss was; "
            f"nothing was saved or exported: rerun with --redo iter_{k}/train --allow-config-change "
            f"--set dpo.learning_rate={cfg.dpo.learning_rate / 10:g}"
        )
    policy_dir = save_params(d / "policy", state.params, model.config)
    summary = run.from_writer(_metrics_summary, metrics_path)
    run.write_json(d / "stats.json", {"steps": num_steps, **summary})
    return {"policy": str(policy_dir), "metrics": str(metrics_path), "stats": summary}


def _truncate_metrics(path: AnyPath, step: int) -> None:
    """The metrics file as of the restored step (lidr_jax.train.metrics.truncate_metrics: later lines and a
    last line cut by a kill dropped), with a warning when a kill had cut the last line."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []
    try:
        truncate_metrics(path, step)
    except ValueError as e:
        raise MetricsFileError(f"{e}, or redo the stage (--redo iter_K/train)") from None
    try:
        json.loads(lines[-1] if lines else "{}")
    except json.JSONDecodeError:
        warnings.warn(f"{path}: dropped a last line cut by a kill ({lines[-1][:60]!r})", stacklevel=2)


def _metrics_summary(path: AnyPath) -> dict:
    rows = read_jsonl(path)
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    keys = ("loss", "rewards/accuracies", "rewards/margins", "nll_loss")
    return {"first": {k: first[k] for k in keys if k in first}, "last": {k: last[k] for k in keys if k in last}}


def export_stage(it: Iteration) -> dict:
    """The trained policy as a Hugging Face directory (`iter_K/export/hf`) in `export_dtype`; then, unless
    `keep_train_checkpoints`, the training checkpoints (weights + AdamW state) are deleted: the params-only
    policy (`iter_K/train/policy`) and the export hold everything later stages read. Records the disk
    the iteration's directory uses (the run report shows it). A run directory on an object store gets
    the export written locally first, then uploaded (safetensors writes local files only)."""
    d = it.run.stage_dir(it.k, "export")
    options = dict(dtype=it.cfg.export_dtype, card=card_info(it.run, it.k), replace=True)
    if is_local(d):
        out = export_hf(it.trained, d / "hf", **options)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(it.trained, Path(tmp) / "hf", **options)
            it.run.on_writer(remove_tree, d / "hf")  # an earlier, killed attempt's files
            it.run.on_writer(upload_tree, Path(tmp) / "hf", d / "hf")
        out = d / "hf"
    checkpoints = it.run.stage_dir(it.k, "train", create=False) / "checkpoints"
    # the writer alone deletes and counts: another process would walk the writer's files as they change
    disk = it.run.on_writer(_clean_and_count, it.run.iter_dir(it.k), checkpoints, it.cfg.keep_train_checkpoints)
    return {"hf": str(out), "disk": disk}


def _clean_and_count(iteration: AnyPath, checkpoints: AnyPath, keep: bool) -> dict:
    """The training checkpoints deleted unless `keep`; the bytes the iteration's directory holds after."""
    deleted = 0
    if not keep and checkpoints.exists():
        deleted = tree_bytes(checkpoints)
        remove_tree(checkpoints)
    return {"iteration_bytes": tree_bytes(iteration), "deleted_checkpoint_bytes": deleted}
