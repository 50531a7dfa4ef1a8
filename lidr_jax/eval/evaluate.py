"""Evaluation: MGSM accuracy, X-AlpacaEval outputs for alpaca_eval, off-target rates, head-to-head.

Command line (each subcommand has --help; each writes JSON under --out and prints a per-language table):

    python -m lidr_jax.evaluate mgsm --model smollm2-135m-instruct --data ../shared/data/mgsm --limit 20
    python -m lidr_jax.evaluate alpaca-outputs --model DIR --data ../shared/data/x-alpacaeval --decoding lidr \
        --reference ../shared/data/x-alpacaeval/reference
    python -m lidr_jax.evaluate alpaca-judge-files --outputs A/alpaca --reference B/alpaca   # A vs B
    python -m lidr_jax.evaluate head-to-head --outputs-1 A/alpaca --outputs-2 B/alpaca --judge-url URL ...

In the pipeline: `evaluate_model(model, EvalConfig(...), out_dir)` -> {metric: {lang: value}} after
each iteration, and `lidr_jax.eval.plots.plot_metrics(history, png)` for the curves.

X-AlpacaEval outputs are written in alpaca_eval's `model_outputs.json` format, one file per language
(`OUT/{lang}/model_outputs.json`, a JSON list of {instruction, output, generator, dataset}). With a
reference (`--reference`, per-language `{lang}/model_outputs.json`), each language folder also gets the
matching reference rows, an annotator config with the same-language rule, and the exact `alpaca_eval`
command (lidr_jax.eval.alpaca): alpaca_eval joins on the instruction text, so each language must be
judged against references in that language.
Decoding presets follow the papers: "lidr" = greedy, repetition penalty 1.1; "icr" = temperature 0.6,
top-p 0.9; both at most 2,048 new tokens by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lidr_jax.endpoint import EndpointRequestError, EndpointUnreachableError
from lidr_jax.eval.alpaca import (
    ANNOTATOR_HELP,
    ANNOTATORS,
    DEFAULT_JUDGE,
    judge_output_folder,
    reference_file,
    write_judge_files,
)
from lidr_jax.eval.judge import EndpointJudge, LocalJudge, head_to_head
from lidr_jax.eval.mgsm import MGSM_LANGUAGES, mgsm_file, mgsm_messages, read_mgsm, score_mgsm
from lidr_jax.files import as_path, atomic_write_json, atomic_write_text, read_json, read_utf8
from lidr_jax.formats.load import ModelNotFoundError, check_model_files, load_pretrained, model_path
from lidr_jax.methods.langid import off_target_rate
from lidr_jax.sampling import sampler
from lidr_jax.settings import check_settings, setting

Benchmark = Literal["mgsm", "alpaca"]
BENCHMARKS = typing.get_args(Benchmark)
PAPER_LANGUAGES = ("en", "es", "ru", "de", "fr")
DECODING = {  # name -> SamplingConfig fields
    "lidr": dict(temperature=0.0, repetition_penalty=1.1),
    "icr": dict(temperature=0.6, top_p=0.9),
    "greedy": dict(temperature=0.0),
}
Decoding = Literal[tuple(DECODING)]  # a Literal of a tuple is a Literal of its items: the names above


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `evaluate_model` runs after an iteration. A benchmark listed needs its data path."""

    benchmarks: tuple[Benchmark, ...] = setting(BENCHMARKS, "which benchmarks run: mgsm, alpaca (X-AlpacaEval)")
    mgsm_languages: tuple[str, ...] = setting(MGSM_LANGUAGES, "MGSM's languages evaluated")
    alpaca_languages: tuple[str, ...] = setting(PAPER_LANGUAGES, "X-AlpacaEval's languages evaluated")
    limit: int | None = setting(50, "first N items per language; null = all (250 MGSM, 805 X-AlpacaEval)", ge=1)
    mgsm_dir: str | None = setting(None, "folder of mgsm_{lang}.tsv, e.g. ../shared/data/mgsm")
    alpaca_dir: str | None = setting(None, "folder of {lang}.json, e.g. ../shared/data/x-alpacaeval")
    mgsm_few_shot_k: int = setting(0, "solved examples shown before each question (0 = zero-shot)", ge=0)
    mgsm_few_shot_dir: str | None = setting(None, "folder of mgsm_{lang}.tsv to take them from (not the test file)")
    mgsm_max_new_tokens: int = setting(512, "new tokens per MGSM answer at most", ge=1)
    mgsm_decoding: Decoding = setting(
        "greedy", 'see DECODING; "lidr" (repetition penalty 1.1) is the LIDR authors\' preset'
    )
    alpaca_decoding: Decoding = setting("lidr", '"lidr" or "icr", see DECODING')
    alpaca_max_new_tokens: int = setting(2048, "new tokens per X-AlpacaEval answer at most", ge=1)
    system_prompt: str | None = setting(None, 'e.g. "You are a helpful assistant." (LIDR with Llama-3)')
    generator: str | None = setting(None, "the alpaca_eval generator name; default from the model's source")
    alpaca_reference: str | None = setting(None, "folder of {lang}/model_outputs.json: also write alpaca_eval's files")
    alpaca_judge: str = setting(DEFAULT_JUDGE, "the judge model named in the annotator configs")
    alpaca_annotator: Literal["weighted", "plain"] = setting(
        "weighted", "weighted: the judge's log-probabilities weight the preference (the papers'); plain: a verdict"
    )
    batch_size: int = setting(32, "engine slots when generating the benchmarks' answers", ge=1)
    seed: int = setting(0, "seed of the benchmarks' sampling (decodings that sample)")
    progress: bool = setting(True, "progress bars while answering")

    def __post_init__(self):
        for name in ("benchmarks", "mgsm_languages", "alpaca_languages"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        check_settings(self)
        if self.mgsm_few_shot_k and not self.mgsm_few_shot_dir:
            raise ValueError("EvalConfig.mgsm_few_shot_k > 0 needs mgsm_few_shot_dir (a folder of mgsm_{lang}.tsv)")


def _sampling(cfg_fields: dict, max_new_tokens: int, batch_size: int, seed: int, progress: bool):
    # A prompt over the context after max_new_tokens is never cut: it gets an empty answer, counted
    # (finish reason "prompt_too_long": X-AlpacaEval's summary reports it per language).
    return sampler.SamplingConfig(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        long_prompts="skip",
        **cfg_fields,
    )


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages


def check_data(cfg: EvalConfig, benchmarks: Sequence[str] | None = None) -> None:
    """What the benchmarks of `cfg` (or `benchmarks`) read, checked before any model loads: each
    language's data file exists and every item of it parses, MGSM has an instruction in the language,
    the few-shot files and the X-AlpacaEval references exist. The evaluate command calls it before
    loading; a pipeline can call it before its run starts."""
    benchmarks = cfg.benchmarks if benchmarks is None else benchmarks
    if "mgsm" in benchmarks:
        if not cfg.mgsm_dir:
            raise ValueError("MGSM needs its data folder: set mgsm_dir (--data) to a folder of mgsm_{lang}.tsv")
        for lang in cfg.mgsm_languages:
            read_mgsm(mgsm_file(cfg.mgsm_dir, lang))  # every row: a bad row 200 fails now, not after generating
            mgsm_messages("", lang)  # a language without an MGSM instruction
            if cfg.mgsm_few_shot_k:
                read_mgsm(mgsm_file(cfg.mgsm_few_shot_dir, lang))
    if "alpaca" in benchmarks:
        if not cfg.alpaca_dir:
            raise ValueError("X-AlpacaEval needs its data folder: set alpaca_dir (--data) to a folder of {lang}.json")
        for lang in cfg.alpaca_languages:
            read_x_alpacaeval(as_path(cfg.alpaca_dir) / f"{lang}.json")
            if cfg.alpaca_reference:
                reference_file(cfg.alpaca_reference, lang)


def run_mgsm(model, cfg: EvalConfig, generate_fn=None) -> dict[str, dict]:
    """Generate (`cfg.mgsm_decoding`, greedy by default) and score MGSM for every language of `cfg`:
    {lang: score_mgsm(...)}.
    `generate_fn` (default `sampler.generate`) generates, e.g. `multihost.generate_across_processes`."""
    check_data(cfg, ("mgsm",))
    generate = generate_fn or _sampler_generate()
    items = {lang: read_mgsm(mgsm_file(cfg.mgsm_dir, lang), cfg.limit) for lang in cfg.mgsm_languages}
    chats, owners = [], []
    for lang, lang_items in items.items():
        shots = read_mgsm(mgsm_file(cfg.mgsm_few_shot_dir, lang), cfg.mgsm_few_shot_k) if cfg.mgsm_few_shot_k else []
        for item in lang_items:
            chats.append(_with_system(mgsm_messages(item.question, lang, shots), cfg.system_prompt))
            owners.append(lang)
    sampling = _sampling(DECODING[cfg.mgsm_decoding], cfg.mgsm_max_new_tokens, cfg.batch_size, cfg.seed, cfg.progress)
    results = generate(model, chats, sampling)  # every language in one call: fuller batches
    outputs = {lang: [] for lang in items}
    too_long = {lang: [] for lang in items}  # finish reason "prompt_too_long": not answered, counted
    for lang, r in zip(owners, results):
        outputs[lang].append(r.text)
        too_long[lang].append(r.finish_reason == "prompt_too_long")
    return {lang: score_mgsm(items[lang], outputs[lang], lang, too_long[lang]) for lang in items}


def _sampler_generate():
    return sampler.generate  # looked up at call time, so tests can replace it


def read_x_alpacaeval(path: str | Path, limit: int | None = None) -> list[dict]:
    """X-AlpacaEval items of one language: a JSON list of {id, dataset, instruction}."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"X-AlpacaEval file {path} not found; point the data path at a folder of {{lang}}.json")
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects with an 'instruction' field")
    for i, row in enumerate(rows):
        bad = "is not an object" if not isinstance(row, dict) else None
        if bad is None and not isinstance(row.get("instruction"), str):
            bad = (
                "has no 'instruction'"
                if "instruction" not in row
                else (f"has an 'instruction' that is not a string ({type(row['instruction']).__name__})")
            )
        if bad is not None:
            raise ValueError(
                f"{path}:{json_item_line(read_utf8(path), i)}: item {i + 1} {bad}; each item is an object whose "
                "'instruction' is a string"
            )
    return rows[:limit] if limit is not None else rows


def json_item_line(text: str, index: int) -> int:
    """The line where item `index` of the JSON list `text` starts (for naming a bad item)."""
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    for _ in range(index + 1):
        while text[pos] in " \t\r\n,":
            pos += 1
        start = pos
        _, pos = decoder.raw_decode(text, pos)
    return text.count("\n", 0, start) + 1


def alpaca_records(items: Sequence[dict], outputs: Sequence[str], generator: str) -> list[dict]:
    """alpaca_eval's model_outputs.json rows: instruction, output, generator, dataset."""
    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} instructions but {len(outputs)} outputs")
    return [
        dict(instruction=it["instruction"], output=out, generator=generator, dataset=it.get("dataset", "x-alpacaeval"))
        for it, out in zip(items, outputs)
    ]


def default_generator(model, decoding: str) -> str:
    """`lidr_jax-{name}-{decoding}`; a run's export (RUN/iter_K/export/hf, RUN/iter_K/train/policy) is named
    `{run}-iter_K`, so two iterations' outputs of one run carry different names."""
    parts = Path(str(getattr(model, "source", "model")).split(" (")[0].rstrip("/")).parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].startswith("iter_") and parts[i][5:].isdigit():
            return f"lidr_jax-{parts[i - 1]}-{parts[i]}-{decoding}"
    return f"lidr_jax-{parts[-1] if parts else 'model'}-{decoding}"


def run_alpaca_outputs(
    model,
    cfg: EvalConfig,
    out_dir: str | Path,
    generate_fn=None,
    write=atomic_write_json,
    write_text=atomic_write_text,
) -> dict[str, dict]:
    """Generate X-AlpacaEval outputs for every language of `cfg` and write OUT/{lang}/model_outputs.json
    (through `write(path, obj)`; `generate_fn` as in `run_mgsm`). With `cfg.alpaca_reference`, also
    alpaca_eval's files for each language (lidr_jax.eval.alpaca.write_judge_files).

    Returns {lang: {"n", "off_target_rate", "truncated_rate", "prompt_too_long", "mean_chars", "path"}}
    (prompt_too_long: instructions over the context after max_new_tokens, answered empty, never cut), plus
    "alpaca_eval_command" per language when a reference is given."""
    check_data(cfg, ("alpaca",))  # a missing file or reference fails before any generation
    generate = generate_fn or _sampler_generate()
    generator = cfg.generator or default_generator(model, cfg.alpaca_decoding)
    data, out_dir = as_path(cfg.alpaca_dir), as_path(out_dir)
    items = {lang: read_x_alpacaeval(data / f"{lang}.json", cfg.limit) for lang in cfg.alpaca_languages}
    chats = [
        _with_system([{"role": "user", "content": it["instruction"]}], cfg.system_prompt)
        for lang in items
        for it in items[lang]
    ]
    sampling = _sampling(
        DECODING[cfg.alpaca_decoding], cfg.alpaca_max_new_tokens, cfg.batch_size, cfg.seed, cfg.progress
    )
    results = iter(generate(model, chats, sampling))
    summary = {}
    for lang, lang_items in items.items():
        res = [next(results) for _ in lang_items]
        texts = [r.text for r in res]
        rows = alpaca_records(lang_items, texts, generator)
        path = write(out_dir / lang / "model_outputs.json", rows)
        n = len(texts)
        summary[lang] = dict(
            n=n,
            off_target_rate=off_target_rate(texts, lang),
            truncated_rate=sum(r.finish_reason == "length" for r in res) / n if n else 0.0,
            prompt_too_long=sum(r.finish_reason == "prompt_too_long" for r in res),
            mean_chars=sum(map(len, texts)) / n if n else 0.0,
            path=str(path),
        )
        if cfg.alpaca_reference:
            summary[lang]["alpaca_eval_command"] = write_judge_files(
                out_dir / lang,
                lang,
                rows,
                cfg.alpaca_reference,
                cfg.alpaca_judge,
                write_json=write,
                write_text=write_text,
                annotator=cfg.alpaca_annotator,
            )
    write(out_dir / "summary.json", dict(generator=generator, decoding=cfg.alpaca_decoding, languages=summary))
    return summary


def evaluate_model(
    model, eval_config: EvalConfig, out_dir: str | Path, *, generate_fn=None, write=atomic_write_json
) -> dict[str, dict[str, float]]:
    """Run the benchmarks of `eval_config` on `model`; write everything under `out_dir`.

    Returns {metric: {lang: value}} with metrics mgsm_accuracy, mgsm_off_target, mgsm_prompt_too_long
    (MGSM: problems whose prompt did not fit the context, scored wrong) and
    alpaca_off_target, alpaca_truncated (X-AlpacaEval outputs); also written to OUT/metrics.json.
    `generate_fn` replaces `sampler.generate` and `write(path, obj)` writes each JSON file (the
    pipeline passes data-parallel generation and its run directory's writer).
    """
    out_dir = as_path(out_dir)  # a local folder or a run directory in a bucket (gs://...)
    metrics: dict[str, dict[str, float]] = {}
    if "mgsm" in eval_config.benchmarks:
        scores = run_mgsm(model, eval_config, generate_fn)
        for lang, s in scores.items():
            write(out_dir / "mgsm" / f"{lang}.json", s)
        metrics["mgsm_accuracy"] = {lang: s["accuracy"] for lang, s in scores.items()}
        metrics["mgsm_off_target"] = {lang: s["off_target_rate"] for lang, s in scores.items()}
        metrics["mgsm_prompt_too_long"] = {lang: s["prompt_too_long"] for lang, s in scores.items()}
    if "alpaca" in eval_config.benchmarks:
        summary = run_alpaca_outputs(model, eval_config, out_dir / "alpaca", generate_fn, write)
        metrics["alpaca_off_target"] = {lang: s["off_target_rate"] for lang, s in summary.items()}
        metrics["alpaca_truncated"] = {lang: s["truncated_rate"] for lang, s in summary.items()}
    write(out_dir / "metrics.json", metrics)
    return metrics


def read_model_outputs(outputs_dir: str | Path, lang: str) -> list[dict]:
    path = as_path(outputs_dir) / lang / "model_outputs.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write it with `python -m lidr_jax.evaluate alpaca-outputs`")
    return read_json(path)


def head_to_head_dirs(
    dir_1, dir_2, langs: Sequence[str], judge, limit: int | None = None, on_result=None
) -> dict[str, dict]:
    """Judge the model_outputs.json of two output folders against each other, per language;
    `on_result(lang, result)` runs as each language finishes. Every file is read and checked first."""
    rows = {}
    for lang in langs:
        rows_1, rows_2 = read_model_outputs(dir_1, lang)[:limit], read_model_outputs(dir_2, lang)[:limit]
        if [r["instruction"] for r in rows_1] != [r["instruction"] for r in rows_2]:
            raise ValueError(f"{lang}: the two output files do not hold the same instructions in the same order")
        rows[lang] = (rows_1, rows_2)
    results = {}
    for lang, (rows_1, rows_2) in rows.items():
        results[lang] = head_to_head(
            [r["instruction"] for r in rows_1], [r["output"] for r in rows_1], [r["output"] for r in rows_2], judge
        )
        if on_result is not None:
            on_result(lang, results[lang])
    return results


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per language, one column per metric."""
    langs = sorted({lang for col in columns.values() for lang in col})
    names = list(columns)
    width = max([8] + [len(n) for n in names])
    lines = ["lang  " + "  ".join(n.rjust(width) for n in names)]
    for lang in langs:
        cells = []
        for n in names:
            v = columns[n].get(lang)
            cells.append(("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)).rjust(width))
        lines.append(f"{lang:<6}" + "  ".join(cells))
    return "\n".join(lines)


def _langs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lidr_jax.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{mgsm,alpaca-outputs,alpaca-judge-files,head-to-head}"
    )

    def generation_args(p, data_help, langs_default, max_new):
        p.add_argument("--model", required=True, help="HF directory, .gguf file or smollm2-135m-instruct")
        p.add_argument("--data", required=True, help=data_help)
        p.add_argument("--langs", type=_langs, default=langs_default, help="comma-separated ISO codes")
        p.add_argument("--limit", type=int, default=None, help="first N items per language (default: all)")
        p.add_argument("--max-new-tokens", type=int, default=max_new)
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--system-prompt", default=None, help='e.g. "You are a helpful assistant."')
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--out", required=True, help="output folder (JSON results)")

    m = sub.add_parser("mgsm", help="MGSM accuracy and off-target rate per language (greedy)")
    generation_args(m, "folder of mgsm_{lang}.tsv", MGSM_LANGUAGES, 512)
    m.add_argument("--few-shot-k", type=int, default=0, help="solved examples before each question")
    m.add_argument("--few-shot-data", default=None, help="folder of mgsm_{lang}.tsv to take the examples from")

    a = sub.add_parser("alpaca-outputs", help="X-AlpacaEval generations in alpaca_eval's model_outputs.json format")
    generation_args(a, "folder of X-AlpacaEval {lang}.json", PAPER_LANGUAGES, 2048)
    a.add_argument(
        "--decoding",
        choices=sorted(DECODING),
        default="lidr",
        help="lidr: greedy, repetition penalty 1.1; icr: temperature 0.6, top-p 0.9",
    )
    a.add_argument("--generator", default=None, help="generator name written into every row")
    a.add_argument(
        "--reference",
        default=None,
        help="references in each language: a folder of {lang}/model_outputs.json (e.g. "
        "../shared/data/x-alpacaeval/reference) or a path containing {lang}; writes what alpaca_eval needs "
        "beside each model_outputs.json and prints the alpaca_eval command",
    )
    a.add_argument("--annotator-model", default=DEFAULT_JUDGE, help="judge model named in the annotator configs")
    a.add_argument("--annotator", choices=ANNOTATORS, default="weighted", help=ANNOTATOR_HELP)

    j = sub.add_parser(
        "alpaca-judge-files",
        help="alpaca_eval files for an existing outputs folder; a reference that is another outputs folder "
        "judges the two models head to head",
    )
    j.add_argument("--outputs", required=True, help="alpaca-outputs folder ({lang}/model_outputs.json)")
    j.add_argument("--reference", required=True, help="folder of {lang}/model_outputs.json, or a path with {lang}")
    j.add_argument("--langs", type=_langs, default=PAPER_LANGUAGES)
    j.add_argument("--force", action="store_true", help="replace judge files written earlier for these outputs")
    j.add_argument("--annotator-model", default=DEFAULT_JUDGE, help="judge model named in the annotator configs")
    j.add_argument("--annotator", choices=ANNOTATORS, default="weighted", help=ANNOTATOR_HELP)

    h = sub.add_parser("head-to-head", help="win/tie/lose per language of model 1 against model 2, by a judge")
    h.add_argument("--outputs-1", help="alpaca-outputs folder of model 1 ({lang}/model_outputs.json)")
    h.add_argument("--outputs-2", help="alpaca-outputs folder of model 2")
    h.add_argument("--model-1", help="generate model 1's outputs first (instead of --outputs-1)")
    h.add_argument("--model-2", help="generate model 2's outputs first (instead of --outputs-2)")
    h.add_argument("--data", help="X-AlpacaEval folder, needed with --model-1/--model-2")
    h.add_argument("--decoding", choices=sorted(DECODING), default="lidr")
    h.add_argument("--max-new-tokens", type=int, default=2048)
    h.add_argument("--batch-size", type=int, default=32)
    h.add_argument("--system-prompt", default=None)
    h.add_argument("--langs", type=_langs, default=PAPER_LANGUAGES)
    h.add_argument("--limit", type=int, default=None, help="first N instructions per language")
    h.add_argument("--judge-model", help="a local model as the judge (HF directory, .gguf, embedded name)")
    h.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    h.add_argument("--judge-name", help="the model name sent to the endpoint")
    h.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="NAME of the environment variable holding the API key ('' for none)",
    )
    h.add_argument(
        "--judge-timeout",
        type=float,
        default=120.0,
        help="seconds without an answer from --judge-url after which head-to-head gives up (default 120); "
        "a one-line notice is printed after 10 s",
    )
    h.add_argument("--no-progress", action="store_true")
    h.add_argument("--out", required=True)
    return parser


def _load(path: str):
    return load_pretrained(path)


def _check_model(spec: str, flag: str) -> None:
    """`spec` names something loadable (a model directory, a .gguf file or an embedded name), checked
    before any model loads; what is inside is checked when it loads."""
    try:
        model_path(spec)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{flag}: {e}") from None


def _check_model_files(spec: str, flag: str) -> None:
    """What loading `spec` would refuse that can be found without reading the weights (remote code,
    truncated safetensors, tokenizer files: lidr_jax.formats.load.check_model_files); after the other
    arguments' checks, before the first model loads."""
    check_model_files(spec, flag)


def _load_checked(args, cfg: EvalConfig):
    """--model, loaded once its path and every data file of `cfg` have passed their checks."""
    _check_model(args.model, "--model")
    check_data(cfg)
    _check_model_files(args.model, "--model")
    return _load(args.model)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder for the results (a new one, or earlier results)")


def _eval_config(args, benchmark: str, **fields) -> EvalConfig:
    """A command's EvalConfig: the settings every generating command shares, then its own."""
    shared = dict(limit=args.limit, system_prompt=args.system_prompt, batch_size=args.batch_size)
    langs = {"mgsm": "mgsm_languages", "alpaca": "alpaca_languages"}[benchmark]
    return EvalConfig(benchmarks=(benchmark,), progress=not args.no_progress, **{langs: args.langs}, **shared, **fields)


def _alpaca_config(args, **extra) -> EvalConfig:
    """The X-AlpacaEval generation settings of the alpaca-outputs and head-to-head commands."""
    fields = dict(alpaca_dir=args.data, alpaca_decoding=args.decoding, alpaca_max_new_tokens=args.max_new_tokens)
    return _eval_config(args, "alpaca", **fields, **extra)


def _print_commands(commands: dict[str, str]) -> None:
    print("judge each language against its references (OPENAI_API_KEY must be set for alpaca_eval):")
    for lang, command in commands.items():
        print(f"# {lang}\n{command}")


def run_command(args) -> int:
    if args.command == "alpaca-judge-files":
        _print_commands(
            judge_output_folder(
                args.outputs, args.reference, args.langs, args.annotator_model, args.force, args.annotator
            )
        )
        return 0
    out = Path(args.out)
    _check_out(out)
    if args.command == "mgsm":
        cfg = _eval_config(
            args,
            "mgsm",
            mgsm_dir=args.data,
            mgsm_few_shot_k=args.few_shot_k,
            mgsm_few_shot_dir=args.few_shot_data,
            mgsm_max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        metrics = evaluate_model(_load_checked(args, cfg), cfg, out)
        table = {"accuracy": metrics["mgsm_accuracy"], "off_target": metrics["mgsm_off_target"]}
        if any(metrics["mgsm_prompt_too_long"].values()):  # never cut: said where it happened
            table["prompt_too_long"] = metrics["mgsm_prompt_too_long"]
        print(format_table(table))
    elif args.command == "alpaca-outputs":
        cfg = _alpaca_config(
            args,
            generator=args.generator,
            alpaca_reference=args.reference,
            alpaca_judge=args.annotator_model,
            alpaca_annotator=args.annotator,
            seed=args.seed,
        )
        summary = run_alpaca_outputs(_load_checked(args, cfg), cfg, out)
        print(
            format_table(
                {
                    k: {lang: s[k] for lang, s in summary.items()}
                    for k in ("n", "off_target_rate", "truncated_rate", "mean_chars")
                }
            )
        )
        print(f"alpaca_eval files: {out}/{{lang}}/model_outputs.json")
        if args.reference:
            _print_commands({lang: s["alpaca_eval_command"] for lang, s in summary.items()})
    else:
        _head_to_head_command(args, out)
    print(f"results written under {out}")
    return 0


def _head_to_head_command(args, out: Path) -> None:
    """Every argument, output file and the judge's endpoint is checked before any model loads."""
    plan = []
    for i in (1, 2):
        given, model = getattr(args, f"outputs_{i}"), getattr(args, f"model_{i}")
        if bool(given) == bool(model):
            raise ValueError(f"head-to-head: give exactly one of --outputs-{i} or --model-{i}")
        if model and not args.data:
            raise ValueError(f"head-to-head: --model-{i} needs --data (the X-AlpacaEval folder)")
        if model:
            _check_model(model, f"--model-{i}")
        if given:
            for lang in args.langs:
                read_model_outputs(given, lang)  # a language without outputs fails now, not after judging
        else:
            check_data(_alpaca_config(args))
        plan.append((given, model))
    if bool(args.judge_model) == bool(args.judge_url):
        raise ValueError("head-to-head: give exactly one judge: --judge-model PATH or --judge-url URL")
    if args.judge_model:
        _check_model(args.judge_model, "--judge-model")
    judge = None
    if args.judge_url:
        if not args.judge_name:
            raise ValueError("head-to-head: --judge-url needs --judge-name (the model name the endpoint serves)")
        if not (math.isfinite(args.judge_timeout) and args.judge_timeout > 0):
            raise ValueError(f"head-to-head: --judge-timeout must be a number of seconds > 0, got {args.judge_timeout}")
        judge = EndpointJudge(
            args.judge_url,
            args.judge_name,
            api_key_env=args.api_key_env,
            cache_dir=out / "judge_cache",
            timeout_s=args.judge_timeout,  # each request, and every retry together: the stated bound
            max_retry_time_s=args.judge_timeout,
        )
        judge.check()  # an unreachable judge fails in seconds, before any generation
    models = [(f"--model-{i}", m) for i, (_, m) in enumerate(plan, start=1)] + [("--judge-model", args.judge_model)]
    for flag, spec in models:
        if spec:
            _check_model_files(spec, flag)  # what loading would refuse, before any generation
    dirs = []
    for i, (given, model) in enumerate(plan, start=1):
        if model:
            cfg = _alpaca_config(args)
            given = out / f"outputs_{i}"
            run_alpaca_outputs(_load(model), cfg, given)  # one model resident at a time
        dirs.append(given)
    if judge is None:
        judge = LocalJudge(_load(args.judge_model))
    results: dict[str, dict] = {}

    def save(lang: str, result: dict) -> None:  # each language's verdicts are kept as soon as they exist
        results[lang] = result
        atomic_write_json(
            out / "head_to_head.json", dict(outputs_1=str(dirs[0]), outputs_2=str(dirs[1]), languages=results)
        )

    head_to_head_dirs(dirs[0], dirs[1], args.langs, judge, args.limit, on_result=save)
    columns = ("win", "tie", "lose", "win_rate")
    print(format_table({k: {lang: r[k] for lang, r in results.items()} for k in columns}))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except (FileNotFoundError, FileExistsError, ValueError, EndpointRequestError, EndpointUnreachableError) as e:
        print(f"error: {e}", file=sys.stderr)  # bad input or an unusable judge: one line, cause and fix
        return 2


if __name__ == "__main__":
    sys.exit(main())
