"""The ICR half of an iteration: sample -> score -> pairs (METHOD.md 2.5).

K answers per prompt, each scored by the implicit reward log pi_DPO(y|x~) - log pi_ref(y|x~) under
the English-conditioned prompt; the pairs take the best and worst answers of each prompt.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lidr_jax.dist import multihost
from lidr_jax.files import read_jsonl
from lidr_jax.formats.load import Model
from lidr_jax.methods import icr, lidr
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.pipeline.config import RunConfig
from lidr_jax.pipeline.pair_output import write_pairs
from lidr_jax.pipeline.resumable import Job, finish_stats, generate_resumable, prompt_jobs
from lidr_jax.pipeline.run_dir import RunDir


def icr_sample(cfg: RunConfig, run: RunDir, k: int, model: Model, prompts: PromptSet) -> dict:
    """K answers per prompt in its own language (paper: temperature 0.9, top-p 1.0, no system prompt)."""
    d = run.stage_dir(k, "sample")
    sampling = dataclasses.replace(cfg.icr.sampling, n=cfg.icr.samples, seed=cfg.seed * 1000 + k)
    jobs = prompt_jobs(prompts)
    rows = generate_resumable(run, model, jobs, sampling, d / "samples.jsonl", "sample")
    stats = finish_stats(rows, "lang")
    run.write_json(d / "stats.json", stats)
    return {"samples": str(d / "samples.jsonl"), "stats": stats}


def icr_score(
    cfg: RunConfig, run: RunDir, k: int, scorers: tuple[Model, Model], prompts: PromptSet, policy: Model
) -> dict:
    """Implicit reward of every sample: log pi_DPO(y|x~) - log pi_ref(y|x~) under the English-conditioned
    prompt (or a baseline condition). `scorers` = (pi_DPO, pi_ref), loaded one after the other."""
    d = run.stage_dir(k, "score")
    rows = read_jsonl(Path(run.outputs(k, "sample")["samples"]))
    sel = cfg.icr.selection
    english = prompts.by_id(cfg.dominant)
    answers = [(row, j, text) for row in rows for j, text in enumerate(row["outputs"])]
    scored_texts = [text for _, _, text in answers]
    if sel.condition == "translate_answer":
        jobs = []
        for n, (row, j, text) in enumerate(answers):
            if row["lang"] == cfg.dominant:
                continue
            messages, prefill = lidr.translation_request(text, cfg.dominant)
            jobs.append(Job(f"{row['lang']}/{row['id']}/{j}", messages, prefill, {"index": n}))
        out = generate_resumable(
            run,
            policy,
            jobs,
            dataclasses.replace(cfg.icr.translation, seed=cfg.seed),
            d / "answer_translations.jsonl",
            "translate answers",
        )
        for r in out:
            scored_texts[r["index"]] = lidr.parse_translation(r["outputs"][0]) or ""
    items = []
    for (row, _, _), text in zip(answers, scored_texts):
        x_lang = prompts.by_id(row["lang"])[row["id"]]
        messages = icr.icr_scoring_prompt(
            english[row["id"]],
            row["lang"],
            condition=sel.condition,
            translated_instruction=x_lang,
            system_prompt=sel.scoring_system_prompt,
            dominant=cfg.dominant,
        )
        items.append((messages, text))
    logps = [_answer_logprobs(cfg, m, items) for m in scorers]  # pi_DPO, then pi_ref
    rewards = icr.implicit_rewards(logps[0], logps[1])
    scored, start = [], 0
    for row in rows:
        idx = range(start, start + len(row["outputs"]))
        start += len(row["outputs"])
        scored.append(
            {
                "id": row["id"],
                "lang": row["lang"],
                "answers": row["outputs"],
                "rewards": [float(rewards[n]) for n in idx],
                "logp_dpo": [float(logps[0][n]) for n in idx],
                "logp_ref": [float(logps[1][n]) for n in idx],
            }
        )
    run.write_jsonl(d / "scores.jsonl", scored)
    return {"scores": str(d / "scores.jsonl")}


def _answer_logprobs(cfg: RunConfig, model: Model, items: list) -> np.ndarray:
    """Summed log-prob of every (scoring messages, answer) item under `model`; each process scores its
    share on its own devices (lidr_jax.dist.multihost)."""
    inputs = icr.truncate_inputs(
        icr.scoring_inputs(model.tokenizer, items), cfg.dpo.max_prompt_len, cfg.dpo.max_response_len
    )
    with multihost.on_this_process(model) as local:

        def score(share):
            part = icr.ScoringInputs([p for p, _ in share], [r for _, r in share], 0, 0)
            logp = icr.answer_logprobs(
                local.params,
                local.config,
                part,
                local.tokenizer.pad_token_id,
                batch_size=cfg.icr.score_batch_size,
                chunk=cfg.dpo.logprob_chunk,
            )
            return logp.tolist()

        return np.asarray(multihost.map_across_processes(score, list(zip(inputs.prompt_ids, inputs.response_ids))))


def icr_pairs_stage(cfg: RunConfig, run: RunDir, k: int, prompts: PromptSet) -> dict:
    d = run.stage_dir(k, "pairs")
    rows = read_jsonl(Path(run.outputs(k, "score")["scores"]))
    pairs, stats = [], {}
    for lang in prompts.languages:
        mine = [r for r in rows if r["lang"] == lang]
        answers = {r["id"]: r["answers"] for r in mine}
        rewards = {r["id"]: r["rewards"] for r in mine}
        lang_pairs, _, lang_stats = icr.icr_pairs(prompts.by_id(lang), lang, answers, rewards, cfg.icr.selection)
        pairs += lang_pairs
        stats[lang] = lang_stats
    return write_pairs(run, d, pairs, {"per_language": stats})
