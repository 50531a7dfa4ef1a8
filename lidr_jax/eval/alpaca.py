"""X-AlpacaEval judged by alpaca_eval against references in the same language.

alpaca_eval joins a model's outputs to the reference outputs on the instruction text, so an English
reference matches no row of a Spanish file. Both papers judged each language against GPT-4-Turbo's
answers in that language, with a judge told that a good answer is written in the instruction's language
unless the instruction asks otherwise. For every language this module writes, beside
`OUT/{lang}/model_outputs.json`:

- `reference_outputs.json`: the reference rows of exactly the same instructions in the same order
  (from a folder of `{lang}/model_outputs.json`, e.g. ../shared/data/x-alpacaeval/reference, or
  another of our output folders for a head-to-head between two models);
- an alpaca_eval annotator config (our own prompt, with the same-language rule naming the language),
  one of two kinds (`ANNOTATORS`):
  - `weighted` (default; `lidr_jax_weighted_judge_{lang}/`): as both papers judged, alpaca_eval's
    log-probability weighted annotator. The judge answers with one token, "a" or "b"; alpaca_eval's
    `logprob_parser` reads the two tokens' probabilities from the judge's `top_logprobs` and the
    preference is 2 - p(a) / (p(a) + p(b)), a number in [1, 2] (1: the reference is better for sure);
  - `plain` (`lidr_jax_judge_{lang}/`): the judge writes "Output (a)" or "Output (b)", parsed by a
    regex: a preference of 1 or 2;
- `alpaca_eval_command.txt`: the exact command, with absolute paths (alpaca_eval resolves a relative
  annotator path against its own config folder), reporting alpaca_eval's `get_winrate` against the
  references. Its leaderboard.csv holds `win_rate` (the mean preference: with the weighted
  annotator the papers' weighted win rate) beside `discrete_win_rate` (each preference rounded to
  win, tie or loss: the plain win rate of the same judgments).

alpaca_eval itself is not a dependency of the product: the files are plain JSON/YAML and the command
runs it (the `test` extra installs it; tests/test_alpaca_weighted.py runs alpaca_eval 0.6.6 on both
kinds against a local fake judge endpoint that returns log-probabilities; OPENAI_BASE_URL selects the
endpoint). docs/reproducing.md says what still differs from the papers' judging.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from lidr_jax.files import absolute_path, as_path, atomic_write_json, atomic_write_text, read_json
from lidr_jax.methods.languages import language_name

DEFAULT_JUDGE = "gpt-4-1106-preview"  # alpaca_eval 2.0's judge; the papers' is a GPT-4-Turbo as well
PROMPT_VERSION = "lidr_jax-alpaca-judge-v1"
WEIGHTED_PROMPT_VERSION = "lidr_jax-alpaca-weighted-judge-v1"
VERDICT_A, VERDICT_B = r"Output \(a\)", r"Output \(b\)"  # regexes: alpaca_eval's preference 1 and 2
TOKEN_A, TOKEN_B = "a", "b"  # the weighted judge's one-token answers: output (a) = output_1 = the reference
ANNOTATORS = ("weighted", "plain")
ANNOTATOR_HELP = (
    "weighted (default): alpaca_eval reads the preference from the judge's token log-probabilities, as "
    "both papers judged; plain: the judge names the better output"
)

# alpaca_eval reads "<|im_start|>role ... <|im_end|>" blocks of a template as chat messages and fills
# {instruction}, {output_1}, {output_2}; it shows the two outputs in a random order itself.
_COMPARE = """<|im_start|>system
You compare two answers an AI assistant gave to the same instruction and say which one a careful
human reader would prefer.
<|im_end|>
<|im_start|>user
The instruction is written in {language}. Prefer the answer that follows the instruction more \
helpfully, correctly and completely. An answer must be written in {language} unless the instruction \
itself asks for another language; an answer in another language is worse than one in {language}, \
however good its content. Neither the order of the answers nor their length decides.

## Instruction
{{instruction}}

## Output (a)
{{output_1}}

## Output (b)
{{output_2}}

"""
# plain: the judge names the better output; weighted: one letter, whose log-probabilities alpaca_eval reads
ANNOTATOR_PROMPT = (
    _COMPARE + 'Reply with exactly one line, "Output (a)" or "Output (b)", and nothing else.\n<|im_end|>\n'
)
WEIGHTED_PROMPT = (
    _COMPARE
    + "Answer with a single lowercase letter and nothing else: a if Output (a) is better, b if Output (b) is better."
    + "\n<|im_end|>\n"
)


def annotator_name(lang: str, kind: str = "weighted") -> str:
    """The annotator's folder and config name: lidr_jax_weighted_judge_{lang} or lidr_jax_judge_{lang}."""
    if kind not in ANNOTATORS:
        raise ValueError(f"annotator must be one of {list(ANNOTATORS)}, got {kind!r}")
    return f"lidr_jax_weighted_judge_{lang}" if kind == "weighted" else f"lidr_jax_judge_{lang}"


def reference_file(reference: str | Path, lang: str) -> Path:
    """The reference outputs of `lang`: `reference` with `{lang}` filled in, or
    `reference/{lang}/model_outputs.json` for a folder (the papers' layout and our own)."""
    text = str(reference)
    path = as_path(text.format(lang=lang)) if "{lang}" in text else as_path(text) / lang / "model_outputs.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{lang}: reference outputs {path} not found; give a folder of {{lang}}/model_outputs.json "
            "(e.g. ../shared/data/x-alpacaeval/reference) or a path containing {lang}"
        )
    return path


def aligned_references(rows: Sequence[dict], reference_rows: Sequence[dict], lang: str) -> list[dict]:
    """The reference row of every output row, joined on `instruction`, in the outputs' order. An
    instruction without a reference (or with two different ones) is an error naming how many."""
    by_instruction: dict[str, dict] = {}
    for ref in reference_rows:
        if not isinstance(ref, dict) or "instruction" not in ref or "output" not in ref:
            raise ValueError(f"{lang}: reference rows need 'instruction' and 'output' fields")
        if ref["instruction"] in by_instruction and by_instruction[ref["instruction"]]["output"] != ref["output"]:
            raise ValueError(f"{lang}: the reference holds two different outputs for one instruction")
        by_instruction[ref["instruction"]] = ref
    missing = [r["instruction"] for r in rows if r["instruction"] not in by_instruction]
    if missing:
        raise ValueError(
            f"{lang}: {len(missing)} of {len(rows)} instructions have no reference row (first: "
            f"{missing[0][:80]!r}); the reference must be in the same language as the outputs"
        )
    return [dict(by_instruction[r["instruction"]]) for r in rows]


def annotator_config(lang: str, judge_model: str, kind: str = "weighted") -> tuple[str, str]:
    """(configs.yaml text, prompt.txt text) of the annotator `annotator_name(lang, kind)` (module
    docstring)."""
    name = annotator_name(lang, kind)
    # JSON strings are valid YAML scalars: no YAML writer needed, and every character survives.
    q = json.dumps
    weighted = kind == "weighted"
    prompt = (WEIGHTED_PROMPT if weighted else ANNOTATOR_PROMPT).format(language=language_name(lang))
    if weighted:  # the answer is read from the log-probs of one token, not sampled: temperature has no effect
        decoding = "    max_tokens: 1\n    temperature: 1\n    logprobs: true\n    top_logprobs: 5\n"
        parser = (
            '  fn_completion_parser: "logprob_parser"\n  completion_parser_kwargs:\n'
            f"    numerator_token: {q(TOKEN_A)}\n    denominator_tokens: [{q(TOKEN_A)}, {q(TOKEN_B)}]\n"
            '    is_binarize: false\n  completion_key: "completions_all"\n'
        )
    else:
        decoding = "    max_tokens: 10\n    temperature: 0\n"
        parser = (
            '  fn_completion_parser: "regex_parser"\n  completion_parser_kwargs:\n    outputs_to_match:\n'
            f"      1: {q(VERDICT_A)}\n      2: {q(VERDICT_B)}\n"
        )
    version = WEIGHTED_PROMPT_VERSION if weighted else PROMPT_VERSION
    yaml = (
        f"# {version}: written by lidr_jax.eval.alpaca for {language_name(lang)} ({lang})\n"
        f"{name}:\n"
        f"  prompt_template: {q(name + '/prompt.txt')}\n"
        '  fn_completions: "openai_completions"\n'
        "  completions_kwargs:\n"
        f"    model_name: {q(judge_model)}\n" + decoding + parser + "  batch_size: 1\n"
    )
    return yaml, prompt


def alpaca_eval_command(lang_dir: Path, lang: str, kind: str = "weighted") -> str:
    """The alpaca_eval command that judges `lang_dir/model_outputs.json` against its references with
    the annotator of `kind`."""
    d = absolute_path(lang_dir)
    parts = [
        "alpaca_eval",
        "evaluate",
        "--model_outputs",
        str(d / "model_outputs.json"),
        "--reference_outputs",
        str(d / "reference_outputs.json"),
        "--annotators_config",
        str(d / annotator_name(lang, kind)),
        "--output_path",
        str(d / "alpaca_eval"),
        # The win rate (weighted by the judge's probabilities with the weighted annotator), not alpaca_eval 2's
        # default length-controlled one, which downloads per-instruction fits of its own English instruction
        # set, which neither exist for nor match X-AlpacaEval's.
        "--fn_metric",
        "get_winrate",
        "--sort_by",
        "win_rate",
    ]
    return " ".join(shlex.quote(p) for p in parts)


def write_judge_files(
    lang_dir: str | Path,
    lang: str,
    rows: Sequence[dict],
    reference: str | Path,
    judge_model: str = DEFAULT_JUDGE,
    *,
    write_json: Callable = atomic_write_json,
    write_text: Callable = atomic_write_text,
    annotator: str = "weighted",
) -> str:
    """Write what alpaca_eval needs to judge `rows` (this language's model_outputs.json rows, already
    in `lang_dir`) against `reference` with the `annotator` kind; returns the command (module docstring)."""
    lang_dir = as_path(lang_dir)
    ref_rows = read_json(reference_file(reference, lang))
    if not isinstance(ref_rows, list):
        raise ValueError(f"{lang}: {reference_file(reference, lang)} is not a JSON list of rows")
    write_json(lang_dir / "reference_outputs.json", aligned_references(rows, ref_rows, lang))
    yaml, prompt = annotator_config(lang, judge_model, annotator)
    write_text(lang_dir / annotator_name(lang, annotator) / "configs.yaml", yaml)
    write_text(lang_dir / annotator_name(lang, annotator) / "prompt.txt", prompt)
    command = alpaca_eval_command(lang_dir, lang, annotator)
    write_text(lang_dir / "alpaca_eval_command.txt", command + "\n")
    return command


def judge_output_folder(
    outputs: str | Path,
    reference: str | Path,
    langs: Sequence[str],
    judge_model: str = DEFAULT_JUDGE,
    force: bool = False,
    annotator: str = "weighted",
) -> dict[str, str]:
    """`write_judge_files` for every language of an existing outputs folder ({lang}/model_outputs.json):
    {lang: command}. With another of our output folders as `reference`, alpaca_eval judges the two
    models head to head. A language whose `reference_outputs.json` exists is refused (FileExistsError,
    before anything is written) unless `force`: it may pair these outputs with another reference."""
    annotator_name("en", annotator)  # an unknown kind fails before anything is read or written
    commands = {}
    for lang in langs:
        path = as_path(outputs) / lang / "model_outputs.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; write it with `python -m lidr_jax.evaluate alpaca-outputs`")
        if not force and (path.parent / "reference_outputs.json").exists():
            raise FileExistsError(
                f"{path.parent / 'reference_outputs.json'} exists (judge files written earlier); "
                "pass --force to replace it and the judge files beside it"
            )
    for lang in langs:
        path = as_path(outputs) / lang / "model_outputs.json"
        rows = read_json(path)
        commands[lang] = write_judge_files(path.parent, lang, rows, reference, judge_model, annotator=annotator)
    return commands
