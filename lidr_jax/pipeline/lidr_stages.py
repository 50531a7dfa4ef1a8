"""The LIDR half of an iteration: generate -> translate -> pairs (METHOD.md).

Every prompt is answered in its own language, the model self-translates the English answer into
every target language and every target answer into English, and the pairs are built from both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lidr_jax.files import read_jsonl
from lidr_jax.formats.load import Model
from lidr_jax.methods import lidr
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.pipeline.config import RunConfig
from lidr_jax.pipeline.pair_output import write_pairs
from lidr_jax.pipeline.resumable import Job, finish_stats, generate_resumable, prompt_jobs
from lidr_jax.pipeline.run_dir import RunDir


def lidr_generate(cfg: RunConfig, run: RunDir, k: int, model: Model, prompts: PromptSet) -> dict:
    """Answer every prompt in its own language (paper: greedy, repetition penalty 1.1)."""
    d = run.stage_dir(k, "generate")
    system = cfg.lidr.pairs.system_prompt
    jobs = prompt_jobs(prompts, system)
    rows = generate_resumable(
        run, model, jobs, dataclasses.replace(cfg.generation, seed=cfg.seed), d / "generations.jsonl", "generate"
    )
    stats = finish_stats(rows, "lang")
    run.write_json(d / "stats.json", stats)
    return {"generations": str(d / "generations.jsonl"), "stats": stats}


def generations_table(path: str | Path) -> dict[str, dict[str, str]]:
    """{lang: {id: answer}} from a generations file (first sample)."""
    table: dict[str, dict[str, str]] = {}
    for row in read_jsonl(Path(path)):
        table.setdefault(row["lang"], {})[row["id"]] = row["outputs"][0]
    return table


def lidr_translate(cfg: RunConfig, run: RunDir, k: int, model: Model, prompts: PromptSet) -> dict:
    """Self-translate y_en into every X and every y_X into English with the same model."""
    d = run.stage_dir(k, "translate")
    gens = generations_table(run.outputs(k, "generate")["generations"])
    tasks = lidr.translation_jobs(prompts, gens, cfg.dominant)
    system = cfg.lidr.pairs.system_prompt
    jobs = []
    for t in tasks:
        messages, prefill = lidr.translation_request(t.text, t.target_lang, system)
        jobs.append(
            Job(
                f"{t.direction}/{t.id}",
                messages,
                prefill,
                {"id": t.id, "source": t.source_lang, "target": t.target_lang},
            )
        )
    rows = generate_resumable(
        run,
        model,
        jobs,
        dataclasses.replace(cfg.lidr.translation, seed=cfg.seed),
        d / "raw_translations.jsonl",
        "translate",
    )
    out, failed = [], {}
    for row in rows:
        parsed = lidr.parse_translation(row["outputs"][0])
        direction = f"{row['source']}->{row['target']}"
        failed.setdefault(direction, [0, 0])
        failed[direction][0] += parsed is None
        failed[direction][1] += 1
        out.append(
            {
                "id": row["id"],
                "source": row["source"],
                "target": row["target"],
                "translation": parsed,
                "finish_reason": row["finish_reasons"][0],
            }
        )
    run.write_jsonl(d / "translations.jsonl", out)
    stats = {"failed": {k_: v[0] for k_, v in failed.items()}, "total": {k_: v[1] for k_, v in failed.items()}}
    run.write_json(d / "stats.json", stats)
    return {"translations": str(d / "translations.jsonl"), "stats": stats}


def lidr_pairs(cfg: RunConfig, run: RunDir, k: int, prompts: PromptSet) -> dict:
    d = run.stage_dir(k, "pairs")
    gens = generations_table(run.outputs(k, "generate")["generations"])
    to_target: dict[str, dict] = {}
    to_dominant: dict[str, dict] = {}
    for row in read_jsonl(Path(run.outputs(k, "translate")["translations"])):
        if row["source"] == cfg.dominant:
            to_target.setdefault(row["target"], {})[row["id"]] = row["translation"]
        else:
            to_dominant.setdefault(row["source"], {})[row["id"]] = row["translation"]
    settings = dataclasses.replace(cfg.lidr.pairs, dominant=cfg.dominant, seed=cfg.seed + k)
    pairs, stats = lidr.build_pairs(prompts, gens, to_target, to_dominant, settings)
    return write_pairs(run, d, pairs, stats.to_dict())
