"""Resumable generation over several processes, and the fault injection the kill-and-resume tests use.

`generate_resumable` runs a list of `Job`s in fixed chunks and appends each finished chunk to
`<name>.partial.jsonl` (chunk boundaries are fixed by the job order, so a resumed run batches exactly
as an uninterrupted one and produces the same tokens), then writes the whole output file atomically.
Several processes (lidr_jax.parallel.multihost): each round hands every process one pending chunk on its
own devices; the finished chunks are gathered to every process and the run directory's writer
appends them. `generate_across_processes` is the same split for one call without a partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import Sequence
from typing import Any

import jax

from lidr_jax.files import AnyPath
from lidr_jax.formats.load import Model
from lidr_jax.methods import lidr
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.parallel import multihost
from lidr_jax.parallel.sharding import MeshConfig
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.sampling.sampler import GenerationResult, SamplingConfig, generate


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
    run: RunDir, model: Model, jobs: Sequence[Job], sampling: SamplingConfig, out: AnyPath, desc: str
) -> list[dict]:
    """Run `jobs` in fixed chunks, appending each finished chunk to `out`.partial.jsonl, then write
    `out` (JSONL, one row per job, in job order). Chunks already in the partial file are skipped.

    Several processes: the writer reads the partial file and every process receives its chunks, so
    all agree on what remains; each round hands every process one pending chunk, the finished
    chunks are gathered to every process and the writer appends them. A chunk's rows depend only on
    its jobs, so any process count (and any resume) gives the rows of an uninterrupted single run."""
    # A prompt over the limit is never cut: it is skipped (finish reason "prompt_too_long", counted by
    # the stage that reads the rows, e.g. as `prompt_cut` in the pair table).
    sampling = dataclasses.replace(sampling, long_prompts="skip")
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
                if len(chunks) > 1:  # one chunk: its progress bar's last line is the stage's one final line
                    print(f"  {desc}: chunk {len(done)}/{len(chunks)} done")
                crash_point(f"{desc}:{c['chunk'] + 1}")
    rows = [row for i in range(len(chunks)) for row in done[i]]
    run.write_jsonl(out, rows)
    run.on_writer(partial.unlink, missing_ok=True)
    return rows


def _read_partial(partial: AnyPath) -> list[dict]:
    """The finished chunks in a partial file, [{"chunk": i, "rows": [...]}]; a last line cut by a kill
    is dropped (its chunk is redone)."""
    if not partial.exists():
        return []
    chunks = []
    with partial.open(encoding="utf-8") as f:
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
                "prompt_tokens": samples[0].prompt_tokens,
            }
        )
    return rows


def generate_across_processes(model, prompts, sampling, cfg: MeshConfig | None = None, **kwargs) -> list:
    """`sampler.generate` data parallel over processes (the check stage's `generate_fn` for lidr_jax.eval):
    each process generates its `process_shard` of the prompts on its own devices, results gathered on
    every process in prompt order. With one process this is `generate` on the active mesh (or on
    `cfg`'s mesh when none is active)."""
    prefill = kwargs.pop("prefill", None)
    prefill = prefill if isinstance(prefill, (list, tuple)) else [prefill] * len(prompts)

    def as_json(r):
        return [dataclasses.asdict(x) for x in r] if isinstance(r, list) else dataclasses.asdict(r)

    def from_json(r):
        return [GenerationResult(**x) for x in r] if isinstance(r, list) else GenerationResult(**r)

    with multihost.on_this_process(model, cfg) as local:

        def run(share):
            results = generate(local, [p for p, _ in share], sampling, prefill=[f for _, f in share], **kwargs)
            return [as_json(r) for r in results]

        return [from_json(r) for r in multihost.map_across_processes(run, list(zip(prompts, prefill)))]


def prompt_jobs(prompts: PromptSet, system_prompt: str | None = None) -> list[Job]:
    """One job per (language, prompt), keyed `lang/id`, each prompt a user turn in its own language."""
    return [
        Job(f"{lang}/{pid}", lidr.chat_prompt(text, system_prompt), meta={"id": pid, "lang": lang})
        for lang in prompts.languages
        for pid, text in zip(prompts.ids, prompts.instructions[lang])
    ]


def finish_stats(rows: list[dict], group: str) -> dict:
    """Per value of `row[group]`: answers, answers cut at max_new_tokens, prompts over the prompt limit
    (not generated: `prompt_too_long`), mean answer tokens."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        s = out.setdefault(row[group], {"answers": 0, "length_cut": 0, "prompt_too_long": 0, "mean_tokens": 0.0})
        s["answers"] += len(row["outputs"])
        s["length_cut"] += sum(r == "length" for r in row["finish_reasons"])
        s["prompt_too_long"] += row["finish_reasons"][0] == "prompt_too_long"
        s["mean_tokens"] += sum(row["tokens"])
    for s in out.values():
        s["mean_tokens"] = round(s["mean_tokens"] / max(s["answers"], 1), 1)
    return out
