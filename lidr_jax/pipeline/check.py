"""The check stage: the held-out language check (answer prompts never trained on, measure the share
answered in the asked language) and the configured benchmarks (lidr_jax.eval)."""

from __future__ import annotations

from pathlib import Path

from lidr_jax.eval.evaluate import evaluate_model
from lidr_jax.eval.heldout import measure_checkpoint
from lidr_jax.files import read_jsonl
from lidr_jax.formats.load import Model
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.pipeline.config import RunConfig
from lidr_jax.pipeline.iteration import Iteration
from lidr_jax.pipeline.resumable import generate_across_processes, generate_resumable, prompt_jobs
from lidr_jax.pipeline.run_dir import RunDir


def language_check(cfg: RunConfig, run: RunDir, model: Model, held_out: PromptSet, out: Path, desc: str) -> dict:
    """Answer the held-out prompts in every language and measure the answers (lidr_jax.eval.heldout):
    {metric: {lang: value}} with the in-language share and its 95% bootstrap interval, its paired change
    since the starting model (iteration 0's answers), answer length, and the reference log-likelihood
    where the prompts have reference answers."""
    jobs = prompt_jobs(held_out)
    rows = generate_resumable(run, model, jobs, cfg.sampling("check", 0), out, desc)
    start = run.stage_dir(0, "check", create=False) / out.name
    start_rows = read_jsonl(start) if start != out and start.exists() else None
    return measure_checkpoint(
        model,
        held_out,
        rows,
        start_rows=start_rows,
        seed=cfg.seed,
        scoring=cfg.dpo.compute,
        bucket_multiple=cfg.dpo.bucket_multiple,
    )


def check_stage(it: Iteration) -> dict:
    """The held-out language check (check.enabled, with held-out prompts) and the configured
    benchmarks (evaluation.benchmarks) of the model iteration k ends with (k = 0: the starting model)."""
    cfg, run = it.cfg, it.run
    out = {}
    d = run.stage_dir(it.k, "check")
    if cfg.check.enabled and it.held_out is not None:
        out["held_out"] = language_check(cfg, run, it.trained, it.held_out, d / "held_out.jsonl", "check")
    if cfg.evaluation.benchmarks:
        out["evaluation"] = evaluate_model(
            it.trained, cfg.evaluation, d / "evaluation", generate_fn=generate_across_processes, write=run.write_json
        )
    return out


def has_checks(cfg: RunConfig, held_out: PromptSet | None) -> bool:
    """Whether the check stage has anything to do (else the starting model is not checked)."""
    return (cfg.check.enabled and held_out is not None) or bool(cfg.evaluation.benchmarks)
