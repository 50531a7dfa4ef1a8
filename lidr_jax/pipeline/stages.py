"""The stages of one iteration, each a function from artifacts on disk to artifacts on disk.

    LIDR:  generate -> translate -> pairs -> reference -> train -> export -> check
    ICR:   sample   -> score     -> pairs -> reference -> train -> export -> check

Every stage writes its outputs under `RUN_DIR/iter_K/<stage>/` with atomic writes and is recorded in
the manifest only when complete (lidr_jax.pipeline.run_dir). Long stages resume mid-stage: generation appends
finished chunks to `<name>.partial.jsonl` (chunk boundaries are fixed by the job order, so a resumed
run batches exactly as an uninterrupted one and produces the same tokens); training resumes from its
last Orbax checkpoint (lidr_jax.train.checkpoint).

Several processes (lidr_jax.dist.multihost): every process runs every stage; generation and scoring are
split over them and gathered, so each ends with every row; only the run directory's writer writes
(`run.write_*`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lidr_jax.dist import multihost
from lidr_jax.files import read_jsonl
from lidr_jax.formats.load import Model
from lidr_jax.generate.sampler import SamplingConfig, generate
from lidr_jax.methods import icr, lidr
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.pipeline.config import RunConfig
from lidr_jax.pipeline.run_dir import RunDir


@dataclasses.dataclass(frozen=True)
class Job:
    """One generation: `key` names it in the output file; prompt is a chat message list."""

    key: str
    prompt: list[dict[str, str]]
    prefill: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def crash_point(name: str) -> None:
    """Fault injection for the kill-and-resume tests: `LIDR_JAX_CRASH_AT=<name>` makes the process
    SIGKILL itself here, exactly as a preempted VM would stop (no cleanup, no flush)."""
    if os.environ.get("LIDR_JAX_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def generate_resumable(
    run: RunDir, model: Model, jobs: Sequence[Job], sampling: SamplingConfig, out: Path, desc: str
) -> list[dict]:
    """Run `jobs` in fixed chunks, appending each finished chunk to `out`.partial.jsonl, then write
    `out` (JSONL, one row per job, in job order). Chunks already in the partial file are skipped.

    Several processes: the writer reads the partial file and every process receives its chunks, so
    all agree on what remains; each round hands every process one pending chunk, the finished
    chunks are gathered to every process and the writer appends them. A chunk's rows depend only on
    its jobs, so any process count (and any resume) gives the rows of an uninterrupted single run."""
    partial = out.with_name(out.stem + ".partial.jsonl")
    size = max(sampling.batch_size * 4, 1) // max(sampling.n, 1) or 1
    chunks = [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]
    done = {c["chunk"]: c["rows"] for c in run.from_writer(_read_partial, partial)}
    todo = [i for i in range(len(chunks)) if i not in done]
    if done:
        print(f"  {desc}: resuming, {len(done)} of {len(chunks)} chunks already done")
    rounds = [todo[i : i + jax.process_count()] for i in range(0, len(todo), jax.process_count())]
    with multihost.on_this_process(model) if rounds else contextlib.nullcontext(model) as local:
        for pending in rounds:
            mine = multihost.process_shard(pending)  # at most one chunk per process
            finished = multihost.gather_objects(
                [{"chunk": i, "rows": _chunk_rows(local, chunks[i], sampling)} for i in mine]
            )
            run.append_jsonl(partial, finished)
            for c in finished:
                done[c["chunk"]] = c["rows"]
                print(f"  {desc}: chunk {len(done)}/{len(chunks)} done")
                crash_point(f"{desc}:{c['chunk'] + 1}")
    rows = [row for i in range(len(chunks)) for row in done[i]]
    run.write_jsonl(out, rows)
    run.on_writer(partial.unlink, missing_ok=True)
    return rows


def _read_partial(partial: Path) -> list[dict]:
    """The finished chunks in a partial file, [{"chunk": i, "rows": [...]}]; a last line cut by a kill
    is dropped (its chunk is redone)."""
    if not partial.exists():
        return []
    chunks = []
    with open(partial, encoding="utf-8") as f:
        for line in f:
            try:
                chunks.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return chunks


def _chunk_rows(model: Model, batch: list[Job], sampling: SamplingConfig) -> list[dict]:
    results = generate(model, [j.prompt for j in batch], sampling, prefill=[j.prefill for j in batch])
    rows = []
    for job, res in zip(batch, results):
        samples = res if isinstance(res, list) else [res]
        rows.append(
            {
                "key": job.key,
                **job.meta,
                "outputs": [s.text for s in samples],
                "finish_reasons": [s.finish_reason for s in samples],
                "tokens": [len(s.token_ids) for s in samples],
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- LIDR


def lidr_generate(cfg: RunConfig, run: RunDir, k: int, model: Model, prompts: PromptSet) -> dict:
    """Answer every prompt in its own language (paper: greedy, repetition penalty 1.1)."""
    d = run.stage_dir(k, "generate")
    system = cfg.lidr.pairs.system_prompt
    jobs = [
        Job(f"{lang}/{pid}", lidr.chat_prompt(text, system), meta={"id": pid, "lang": lang})
        for lang in prompts.languages
        for pid, text in zip(prompts.ids, prompts.instructions[lang])
    ]
    rows = generate_resumable(
        run, model, jobs, dataclasses.replace(cfg.generation, seed=cfg.seed), d / "generations.jsonl", "generate"
    )
    stats = _finish_stats(rows, "lang")
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
    return _write_pairs(run, d, pairs, stats.to_dict())


def _write_pairs(run: RunDir, d: Path, pairs: Sequence[lidr.Pair], stats: dict) -> dict:
    if not pairs:
        raise RuntimeError(
            f"no preference pairs were built ({json.dumps(stats)}); every translation may have failed: raise "
            "lidr.translation.max_new_tokens or generation.max_new_tokens, or use more prompts"
        )
    run.write_jsonl(d / "pairs.jsonl", [p.as_trl() for p in pairs])
    per_lang: dict[str, int] = {}
    for p in pairs:
        per_lang[p.language] = per_lang.get(p.language, 0) + 1
    stats = {**stats, "pairs_per_language": per_lang, "pairs": len(pairs)}
    run.write_json(d / "stats.json", stats)
    return {"pairs": str(d / "pairs.jsonl"), "stats": stats}


# -------------------------------------------------------------------------------------------- ICR


def icr_sample(cfg: RunConfig, run: RunDir, k: int, model: Model, prompts: PromptSet) -> dict:
    """K answers per prompt in its own language (paper: temperature 0.9, top-p 1.0, no system prompt)."""
    d = run.stage_dir(k, "sample")
    sampling = dataclasses.replace(cfg.icr.sampling, n=cfg.icr.samples, seed=cfg.seed * 1000 + k)
    jobs = [
        Job(f"{lang}/{pid}", lidr.chat_prompt(text), meta={"id": pid, "lang": lang})
        for lang in prompts.languages
        for pid, text in zip(prompts.ids, prompts.instructions[lang])
    ]
    rows = generate_resumable(run, model, jobs, sampling, d / "samples.jsonl", "sample")
    stats = _finish_stats(rows, "lang")
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
    for (row, j, _), text in zip(answers, scored_texts):
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
    return _write_pairs(run, d, pairs, {"per_language": stats})


# ------------------------------------------------------------------------------------------ shared


def _finish_stats(rows: list[dict], group: str) -> dict:
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        s = out.setdefault(row[group], {"answers": 0, "length_cut": 0, "mean_tokens": 0.0})
        s["answers"] += len(row["outputs"])
        s["length_cut"] += sum(r == "length" for r in row["finish_reasons"])
        s["mean_tokens"] += sum(row["tokens"])
    for s in out.values():
        s["mean_tokens"] = round(s["mean_tokens"] / max(s["answers"], 1), 1)
    return out


def language_check(cfg: RunConfig, run: RunDir, model: Model, held_out: PromptSet, out: Path, desc: str) -> dict:
    """Answer the held-out prompts in every language; the fraction answered in the asked language."""
    from lidr_jax.methods.langid import detect_language

    jobs = [
        Job(f"{lang}/{pid}", lidr.chat_prompt(text), meta={"id": pid, "lang": lang})
        for lang in held_out.languages
        for pid, text in zip(held_out.ids, held_out.instructions[lang])
    ]
    rows = generate_resumable(run, model, jobs, dataclasses.replace(cfg.check.sampling, seed=cfg.seed), out, desc)
    result: dict[str, dict[str, float]] = {"in_language": {}, "mean_tokens": {}}
    for lang in held_out.languages:
        mine = [r for r in rows if r["lang"] == lang]
        hits = [detect_language(r["outputs"][0]) == lang for r in mine]
        result["in_language"][lang] = float(np.mean(hits)) if hits else float("nan")
        result["mean_tokens"][lang] = float(np.mean([r["tokens"][0] for r in mine])) if mine else float("nan")
    return result
