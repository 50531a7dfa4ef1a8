"""The LIDR half of an iteration: generate -> translate -> pairs (docs/method.md).

Every prompt is answered in its own language (in the arithmetic style, wrapped in a request to answer
in it), the translator (the policy by default, or another model, or an OpenAI-compatible endpoint:
lidr_jax.methods.translator) translates the English answer into every target language and every target
answer into English, and the pairs are built from both through the quality filters
(lidr_jax.methods.filters).
"""

from __future__ import annotations

import os

from lidr_jax.files import read_jsonl
from lidr_jax.methods import lidr, translator
from lidr_jax.pipeline.iteration import Iteration
from lidr_jax.pipeline.pair_output import write_pairs
from lidr_jax.pipeline.resumable import Job, finish_stats, generate_resumable, prompt_jobs


def lidr_generate(it: Iteration) -> dict:
    """Answer every prompt in its own language (paper: greedy, repetition penalty 1.1)."""
    cfg, run, k = it.cfg, it.run, it.k
    d = run.stage_dir(k, "generate")
    style = cfg.lidr.prompts
    jobs = prompt_jobs(lidr.styled_prompts(it.prompts, style), style.generation_system_prompt)
    rows = generate_resumable(run, it.policy, jobs, cfg.sampling("generate", k), d / "generations.jsonl", "generate")
    stats = finish_stats(rows, "lang")
    run.write_json(d / "stats.json", stats)
    return {"generations": str(d / "generations.jsonl"), "stats": stats}


def generations_table(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{lang: {id: answer}} from a generations file (first sample)."""
    table: dict[str, dict[str, str]] = {}
    for row in read_jsonl(path):
        table.setdefault(row["lang"], {})[row["id"]] = row["outputs"][0]
    return table


def length_cut_ids(path: str | os.PathLike) -> dict[str, set[str]]:
    """{lang: ids whose answer stopped at the token limit} from a generations file (first sample)."""
    cut: dict[str, set[str]] = {}
    for row in read_jsonl(path):
        if row["finish_reasons"][0] == "length":
            cut.setdefault(row["lang"], set()).add(row["id"])
    return cut


def lidr_translate(it: Iteration) -> dict:
    """Translate y_en into every X and every y_X into English with the configured translator: the
    policy (the paper), another model (loaded for this stage only, the policy released while it
    runs), or an endpoint (answers cached in `translate/endpoint_cache`, so a resumed stage never
    asks twice)."""
    cfg, run, k = it.cfg, it.run, it.k
    d = run.stage_dir(k, "translate")
    gens = generations_table(run.outputs(k, "generate")["generations"])
    tasks = lidr.translation_jobs(it.prompts, gens, cfg.dominant)
    prompt, who = cfg.lidr.prompts.translation, cfg.lidr.translator
    jobs = []
    for t in tasks:
        messages, prefill = lidr.translation_request(t.text, t.target_lang, prompt)
        jobs.append(
            Job(
                f"{t.direction}/{t.id}",
                messages,
                prefill or None,
                {"id": t.id, "source": t.source_lang, "target": t.target_lang},
            )
        )
    sampling = cfg.sampling("translate", k)
    raw = d / "raw_translations.jsonl"
    if who.kind == "endpoint":
        replies = run.from_writer(
            translator.endpoint_translate, who, [(j.prompt, j.prefill) for j in jobs], sampling, d / "endpoint_cache"
        )
        rows = [
            {"key": j.key, **j.meta, "outputs": [r], "finish_reasons": [None], "tokens": [None]}
            for j, r in zip(jobs, replies)
        ]
        run.write_jsonl(raw, rows)
    elif who.kind == "model":
        it.release_policy()  # one model resident at a time; the next stage that needs it reloads it
        print(f"  translate: loading the translator {who.model}")
        model = it.models.load(who.model)
        rows = generate_resumable(run, model, jobs, sampling, raw, "translate")
        del model
    else:
        rows = generate_resumable(run, it.policy, jobs, sampling, raw, "translate")
    out, failed = [], {}
    for row in rows:
        parsed = translator.parse_reply(row["outputs"][0], prompt, who)
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
    stats = {
        "translator": who.name,
        "failed": {k_: v[0] for k_, v in failed.items()},
        "total": {k_: v[1] for k_, v in failed.items()},
    }
    run.write_json(d / "stats.json", stats)
    return {"translations": str(d / "translations.jsonl"), "stats": stats}


def lidr_pairs(it: Iteration) -> dict:
    """Preference pairs from the answers and their translations, through the quality filters
    (lidr_jax.methods.lidr.build_pairs); the per-language table of kept and dropped pairs goes to
    pairs/stats.json, the report and TensorBoard."""
    cfg, run, k = it.cfg, it.run, it.k
    d = run.stage_dir(k, "pairs")
    gens = generations_table(run.outputs(k, "generate")["generations"])
    to_target: dict[str, dict] = {}
    to_dominant: dict[str, dict] = {}
    translations = read_jsonl(run.outputs(k, "translate")["translations"])
    generated = read_jsonl(run.outputs(k, "generate")["generations"])
    too_long = lidr.prompt_cut_ids(generated, translations, cfg.targets, cfg.dominant)  # skipped, never cut
    for row in translations:
        if row["source"] == cfg.dominant:
            to_target.setdefault(row["target"], {})[row["id"]] = row["translation"]
        else:
            to_dominant.setdefault(row["source"], {})[row["id"]] = row["translation"]
    settings = cfg.lidr_pairs(k)
    translated_by = run.outputs(k, "translate").get("stats", {}).get("translator", "policy")
    pairs, stats = lidr.build_pairs(
        lidr.styled_prompts(it.prompts, cfg.lidr.prompts),
        gens,
        to_target,
        to_dominant,
        settings,
        cfg.pair_filters,
        length_cut=length_cut_ids(run.outputs(k, "generate")["generations"]),
        translator=translated_by,
        prompt_cut=too_long,
    )
    return write_pairs(run, d, pairs, stats.to_dict())
