"""The ICR half of an iteration: sample -> score -> pairs (docs/method.md 2.5).

K answers per prompt, each scored by the implicit reward log pi_DPO(y|x~) - log pi_ref(y|x~) under
the English-conditioned prompt; the pairs take the best and worst answers of each prompt.
"""

from __future__ import annotations

import numpy as np

from lidr_jax.files import read_jsonl
from lidr_jax.formats.load import Model
from lidr_jax.methods import icr, lidr
from lidr_jax.methods.filters import PairTable
from lidr_jax.model.scoring import encode_answers, score_answers
from lidr_jax.pipeline.iteration import Iteration
from lidr_jax.pipeline.pair_output import write_pairs
from lidr_jax.pipeline.resumable import Job, finish_stats, generate_resumable, prompt_jobs


def icr_sample(it: Iteration) -> dict:
    """K answers per prompt in its own language (paper: temperature 0.9, top-p 1.0, no system prompt)."""
    cfg, run, k = it.cfg, it.run, it.k
    d = run.stage_dir(k, "sample")
    sampling = cfg.sampling("sample", k)
    jobs = prompt_jobs(it.prompts, cfg.icr.selection.generation_system_prompt)
    rows = generate_resumable(run, it.policy, jobs, sampling, d / "samples.jsonl", "sample")
    stats = finish_stats(rows, "lang")
    run.write_json(d / "stats.json", stats)
    return {"samples": str(d / "samples.jsonl"), "stats": stats}


def scorer_models(it: Iteration) -> tuple[Model, Model]:
    """(pi_DPO, pi_ref) of iteration k (docs/method.md 2.5). icr.scorer=given: icr.dpo_model (default: the
    run's model) and icr.reference_model at iteration 1, then the current policy against the original
    reference (icr.reference=original) or the previous iteration's start model (previous).
    icr.scorer=policy: the current policy against the model the previous iteration started from
    (icr.reference_model at iteration 1). RunConfig checks icr.reference_model is given."""
    cfg, k = it.cfg.icr, it.k
    if cfg.scorer == "policy":
        ref = cfg.reference_model if k == 1 else it.run.iteration_start_model(k - 1)
        return it.policy, it.models.load(ref)
    if k == 1:
        dpo = it.models.load(cfg.dpo_model) if cfg.dpo_model else it.policy
        return dpo, it.models.load(cfg.reference_model)
    ref = cfg.reference_model if cfg.reference == "original" else it.run.iteration_start_model(k - 1)
    return it.policy, it.models.load(ref)


def icr_score(it: Iteration) -> dict:
    """Implicit reward of every sample: log pi_DPO(y|x~) - log pi_ref(y|x~) under the English-conditioned
    prompt (or a baseline condition); the scorers come from `scorer_models`. Answers are scored by the
    scoring pass DPO's reference log-probs use (lidr_jax.model.scoring.encode_answers / score_answers):
    no prompt is cut, an answer only past icr.selection.max_score_tokens (default: the sampling limit + 1,
    so never).
    Empty answers are not scored (reward NaN) while the `empty` filter is on."""
    cfg, run, k, prompts = it.cfg, it.run, it.k, it.prompts
    scorers = scorer_models(it)
    d = run.stage_dir(k, "score")
    rows = read_jsonl(run.outputs(k, "sample")["samples"])
    sel = cfg.icr.selection
    english = prompts.by_id(cfg.dominant)
    if not sel.scoring_input:  # the authors' scoring prompt: the instruction without its `input` field
        english = {
            pid: icr.without_input(x, prompts.inputs.get(cfg.dominant, {}).get(pid)) for pid, x in english.items()
        }
    answers = [(row, j, text) for row in rows for j, text in enumerate(row["outputs"])]
    scored_texts: list[str | None] = [text for _, _, text in answers]
    sampled, translated = cfg.sampling("sample", k), cfg.sampling("translate_answers", k)
    limit = sel.max_score_tokens or sampled.max_new_tokens + 1
    too_long = 0  # translate_answer: translation requests over the prompt limit (skipped; never cut)
    if sel.condition == "translate_answer":
        jobs = []
        for n, (row, j, text) in enumerate(answers):
            if row["lang"] == cfg.dominant:
                continue
            messages, prefill = lidr.translation_request(text, cfg.dominant, sel.translation)
            jobs.append(Job(f"{row['lang']}/{row['id']}/{j}", messages, prefill or None, {"index": n}))
        out = generate_resumable(
            run,
            it.policy,
            jobs,
            translated,
            d / "answer_translations.jsonl",
            "translate answers",
        )
        for r in out:  # the authors' baseline: an unclosed translation keeps its text; an empty one is invalid
            scored_texts[r["index"]] = lidr.parse_translation(r["outputs"][0], sel.translation, keep_unclosed=True)
        limit = sel.max_score_tokens or max(sampled.max_new_tokens, translated.max_new_tokens) + 1
        too_long = sum(r["finish_reasons"][0] == "prompt_too_long" for r in out)
    items, index = [], []
    for n, ((row, _, _), text) in enumerate(zip(answers, scored_texts)):
        if text is None or (cfg.pair_filters.empty and not text.strip()):
            continue
        x_lang = prompts.by_id(row["lang"])[row["id"]]
        messages = icr.icr_scoring_prompt(
            english[row["id"]],
            row["lang"],
            condition=sel.condition,
            translated_instruction=x_lang,
            system_prompt=sel.scoring_system_prompt,
            dominant=cfg.dominant,
            prefix_template=sel.language_prefix,
        )
        items.append((messages, text))
        index.append(n)
    enc = encode_answers(scorers[0].tokenizer, items, limit, sel.score_first_token)
    scoring = cfg.dpo.compute.replace(batch_size=cfg.icr.score_batch_size, compute_dtype=cfg.dtype)
    logps = []
    for m in scorers:  # pi_DPO, then pi_ref
        full = np.full(len(answers), np.nan)
        logp, _ = score_answers(
            m.params, m.config, enc, scoring, bucket_multiple=cfg.dpo.bucket_multiple, progress=True
        )
        full[index] = logp
        logps.append(full)
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
                "finish_reasons": row["finish_reasons"],
                "rewards": [float(rewards[n]) for n in idx],
                "logp_dpo": [float(logps[0][n]) for n in idx],
                "logp_ref": [float(logps[1][n]) for n in idx],
            }
        )
    run.write_jsonl(d / "scores.jsonl", scored)
    stats = {
        "scored": len(items),
        "not_scored": len(answers) - len(items),
        "max_score_tokens": limit,
        "truncated_answers": enc.truncated_answers,
        "translation_prompt_too_long": too_long,
    }
    run.write_json(d / "stats.json", stats)
    return {"scores": str(d / "scores.jsonl"), "stats": stats}


def icr_pairs(it: Iteration) -> dict:
    """Per language, the best and worst scored answers of each prompt (lidr_jax.methods.icr.icr_pairs),
    through the quality filters: an answer that fails them is never chosen. The per-language table
    of kept and dropped pairs goes to pairs/stats.json, the report and TensorBoard."""
    cfg, run, k, prompts = it.cfg, it.run, it.k, it.prompts
    d = run.stage_dir(k, "pairs")
    rows = read_jsonl(run.outputs(k, "score")["scores"])
    languages = [lang for lang in prompts.languages if cfg.icr.selection.english_pairs or lang != cfg.dominant]
    pairs, stats, table = [], {}, PairTable(languages)
    for lang in languages:
        mine = [r for r in rows if r["lang"] == lang]
        answers = {r["id"]: r["answers"] for r in mine}
        rewards = {r["id"]: r["rewards"] for r in mine}
        cut = {r["id"]: [f == "length" for f in r.get("finish_reasons", [])] for r in mine}
        lang_pairs, _, lang_stats = icr.icr_pairs(
            prompts.by_id(lang),
            lang,
            answers,
            rewards,
            cfg.icr.selection,
            cfg.pair_filters,
            length_cut=cut,
            dominant=cfg.dominant,
            prompt_cut={r["id"] for r in mine if r.get("finish_reasons", [None])[0] == "prompt_too_long"},
        )
        pairs += lang_pairs
        stats[lang] = lang_stats
        for _ in lang_pairs:
            table.count(lang, None)
        for reason, n in lang_stats["dropped"].items():
            for _ in range(n):
                table.count(lang, reason)
    return write_pairs(run, d, pairs, {"per_language": stats, "table": table.to_dict()})
