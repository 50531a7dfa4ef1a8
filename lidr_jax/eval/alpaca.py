"""X-AlpacaEval judged by alpaca_eval against references in the same language.

alpaca_eval joins a model's outputs to the reference outputs on the instruction text, so an English
reference matches no row of a Spanish file. Both papers judged each language against GPT-4-Turbo's
answers in that language, with a judge told that a good answer is written in the instruction's language
unless the instruction asks otherwise. For every language this module writes, beside
`OUT/{lang}/model_outputs.json`:

- `reference_outputs.json`: the reference rows of exactly the same instructions in the same order
  (from a folder of `{lang}/model_outputs.json`, e.g. ../shared/data/x-alpacaeval/reference, or
  another of our output folders for a head-to-head between two models);
- `lidr_jax_judge_{lang}/configs.yaml` and `prompt.txt`: an alpaca_eval annotator config (our own
  prompt, with the same-language rule naming the language) that parses "Output (a)" / "Output (b)";
- `alpaca_eval_command.txt`: the exact command, with absolute paths (alpaca_eval resolves a relative
  annotator path against its own config folder), reporting the plain win rate against the references.

alpaca_eval itself is not a dependency: the files are plain JSON/YAML and the command runs it (checked
with alpaca_eval 0.6.6 against a local OpenAI-compatible server: OPENAI_BASE_URL selects the endpoint).
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
VERDICT_A, VERDICT_B = r"Output \(a\)", r"Output \(b\)"  # regexes: alpaca_eval's preference 1 and 2

# alpaca_eval reads "<|im_start|>role ... <|im_end|>" blocks of a template as chat messages and fills
# {instruction}, {output_1}, {output_2}; it shows the two outputs in a random order itself.
ANNOTATOR_PROMPT = """<|im_start|>system
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

Reply with exactly one line, "Output (a)" or "Output (b)", and nothing else.
<|im_end|>
"""


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


def annotator_config(lang: str, judge_model: str) -> tuple[str, str]:
    """(configs.yaml text, prompt.txt text) of the annotator `lidr_jax_judge_{lang}`."""
    name = f"lidr_jax_judge_{lang}"
    prompt = ANNOTATOR_PROMPT.format(language=language_name(lang))
    # JSON strings are valid YAML scalars: no YAML writer needed, and every character survives.
    q = json.dumps
    yaml = (
        f"# {PROMPT_VERSION}: written by lidr_jax.eval.alpaca for {language_name(lang)} ({lang})\n"
        f"{name}:\n"
        f"  prompt_template: {q(name + '/prompt.txt')}\n"
        f'  fn_completions: "openai_completions"\n'
        f"  completions_kwargs:\n"
        f"    model_name: {q(judge_model)}\n"
        f"    max_tokens: 10\n"
        f"    temperature: 0\n"
        f'  fn_completion_parser: "regex_parser"\n'
        f"  completion_parser_kwargs:\n"
        f"    outputs_to_match:\n"
        f"      1: {q(VERDICT_A)}\n"
        f"      2: {q(VERDICT_B)}\n"
        f"  batch_size: 1\n"
    )
    return yaml, prompt


def alpaca_eval_command(lang_dir: Path, lang: str) -> str:
    """The alpaca_eval command that judges `lang_dir/model_outputs.json` against its references."""
    d = absolute_path(lang_dir)
    parts = [
        "alpaca_eval",
        "evaluate",
        "--model_outputs",
        str(d / "model_outputs.json"),
        "--reference_outputs",
        str(d / "reference_outputs.json"),
        "--annotators_config",
        str(d / f"lidr_jax_judge_{lang}"),
        "--output_path",
        str(d / "alpaca_eval"),
        # The plain win rate: alpaca_eval 2's default, the length-controlled one, downloads per-instruction
        # fits of its own English instruction set, which neither exist for nor match X-AlpacaEval's.
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
) -> str:
    """Write what alpaca_eval needs to judge `rows` (this language's model_outputs.json rows, already
    in `lang_dir`) against `reference`; returns the command (module docstring)."""
    lang_dir = as_path(lang_dir)
    ref_rows = read_json(reference_file(reference, lang))
    if not isinstance(ref_rows, list):
        raise ValueError(f"{lang}: {reference_file(reference, lang)} is not a JSON list of rows")
    write_json(lang_dir / "reference_outputs.json", aligned_references(rows, ref_rows, lang))
    yaml, prompt = annotator_config(lang, judge_model)
    write_text(lang_dir / f"lidr_jax_judge_{lang}" / "configs.yaml", yaml)
    write_text(lang_dir / f"lidr_jax_judge_{lang}" / "prompt.txt", prompt)
    command = alpaca_eval_command(lang_dir, lang)
    write_text(lang_dir / "alpaca_eval_command.txt", command + "\n")
    return command


def judge_output_folder(
    outputs: str | Path,
    reference: str | Path,
    langs: Sequence[str],
    judge_model: str = DEFAULT_JUDGE,
    force: bool = False,
) -> dict[str, str]:
    """`write_judge_files` for every language of an existing outputs folder ({lang}/model_outputs.json):
    {lang: command}. With another of our output folders as `reference`, alpaca_eval judges the two
    models head to head. A language whose `reference_outputs.json` exists is refused (FileExistsError,
    before anything is written) unless `force`: it may pair these outputs with another reference."""
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
        commands[lang] = write_judge_files(path.parent, lang, rows, reference, judge_model)
    return commands
