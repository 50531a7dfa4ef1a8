"""`python -m lidr_jax.export`: a run's trained policy, an HF directory or a GGUF file to an HF directory.

    python -m lidr_jax.export RUN_DIR [--iteration K] --out DIR    # iteration K's policy (default: the last)
    python -m lidr_jax.export smollm2-135m-instruct --out DIR      # also a .gguf file or an HF directory

Reading a run directory is the pipeline's business, so the command lives here; the writing is
`lidr_jax.formats.export.export_hf`. Every argument is checked before any model is loaded: the
iteration (it must have a finished training stage whose policy is on disk), `--max-shard-size`, the
source, and the destination (`check_destination`: never a file, the source or a folder holding it,
nor a non-empty folder other than an earlier export, which `--force` replaces). The model card of a
run's export says what the run holds for that iteration (`card_info`). Every bad input is one line on
stderr naming the cause, the file and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lidr_jax.files import AnyPath, absolute_path, as_path
from lidr_jax.formats.export import (
    CONVERSION,
    EXPORT_DTYPES,
    ExportError,
    check_destination,
    export_hf,
    held_out_card,
    parse_size,
)
from lidr_jax.formats.load import LOAD_ERRORS, Model, load_pretrained, model_path
from lidr_jax.pipeline.run_dir import MANIFEST, RunDir, StageNotDoneError
from lidr_jax.train.checkpoint import restore_params

METHODS = {
    "lidr": "LIDR (Language Imbalance Driven Rewarding): iterative DPO on the model's own answers, "
    "its translations of its dominant-language answers preferred over its native ones",
    "icr": "ICR (Implicit Cross-Lingual Rewarding): iterative DPO on the model's own samples, ranked by "
    "a DPO model's implicit reward given the English instruction",
}
_NOT_TRAINED = "none: the run's starting model (iteration 0)"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def open_run(path: str | os.PathLike) -> RunDir:
    """The run directory at `path` (read-only use); a manifest that cannot be read is an `ExportError`."""
    try:
        return RunDir(path)
    except (ValueError, KeyError) as e:  # JSON and UTF-8 decoding errors are ValueErrors
        if str(absolute_path(path) / MANIFEST) in str(e):  # the run directory's own message names the file
            raise ExportError(str(e)) from None
        raise ExportError(
            f"{as_path(path) / MANIFEST}: not a readable run manifest ({type(e).__name__}: {e}); restore it from a "
            "backup, or export the policy checkpoint's run again"
        ) from None


def trained_iteration(run: RunDir, iteration: int | None) -> int:
    """The iteration to export: `iteration` checked against the manifest, or the last trained one."""
    trained = [k for k in run.iterations() if run.is_done(k, "train")]
    if iteration is None:
        if not trained:
            raise ExportError(
                f"{run.path} has no finished training stage yet; nothing to export "
                "(pass --iteration 0 to export the run's starting model)"
            )
        return max(trained)
    if iteration < 0:
        raise ExportError(f"--iteration {iteration}: iterations are numbered from 0 (the starting model)")
    if iteration != 0 and iteration not in trained:
        raise ExportError(
            f"--iteration {iteration}: {run.path} has no finished training stage for iteration {iteration} "
            f"(trained: {', '.join(map(str, trained)) or 'none'}; 0 = the starting model)"
        )
    return iteration


def base_model_name(run: RunDir) -> str:
    """The model the run started from, as its config names it."""
    name = run.config.get("model") or (run.iteration_start_model(min(run.iterations())) if run.iterations() else None)
    if not name:
        raise ExportError(f"{run.manifest_path} names no starting model (config.model); it is not a complete run")
    return name


def policy_path(run: RunDir, k: int) -> AnyPath:
    """Iteration k's trained policy checkpoint, which must be on disk."""
    policy = as_path(run.outputs(k, "train")["policy"])
    if not policy.is_dir():
        raise ExportError(
            f"{policy}: iteration {k}'s trained policy is missing although the manifest marks training done; "
            f"rerun the run to train iteration {k} again"
        )
    return policy


def model_from_run(run_path: str | os.PathLike, iteration: int | None = None) -> Model:
    """The `Model` a run produced: iteration K's trained policy (default: the last trained one) with
    the run's base model tokenizer and generation config. Iteration 0 is the base model itself."""
    run = open_run(run_path)
    k = trained_iteration(run, iteration)
    base = load_pretrained(base_model_name(run))
    if k == 0:
        return base
    params, config = restore_params(policy_path(run, k))
    return dataclasses.replace(base, params=params, config=config, source=f"{run.path} iteration {k}")


def _stats(run: RunDir, k: int, stage: str) -> Mapping[str, Any]:
    if not run.is_done(k, stage):
        return {}
    stats = run.outputs(k, stage).get("stats")
    return stats if isinstance(stats, Mapping) else {}


def _language_tables(stats: Mapping[str, Any], languages: set[str]):
    """(key, {language: value}) for every part of a stage's stats keyed by language: the stats
    themselves (key ""), a `{lang: number}` entry (its key), or a `{lang: {name: number}}` entry
    (key "": its names become the columns)."""

    def by_language(m: Any) -> bool:
        return isinstance(m, Mapping) and bool(m) and set(m) <= languages

    if by_language(stats):
        yield "", stats
    for key, value in stats.items():
        if by_language(value) and key != "pairs_per_language":  # that one is the "pairs" column already
            numbers = all(_is_number(v) for v in value.values())
            yield (key if numbers else ""), value


def per_language_numbers(run: RunDir, k: int) -> dict[str, dict[str, Any]]:
    """{language: {column: number}} for iteration k from what its stages recorded in the manifest:
    pairs per language, failed translations each way, every other table of numbers by language in a
    stage's stats (a stage other than pairs names its columns), and the check stage's held-out
    measurements and evaluation metrics (None where a language has no value)."""
    config = run.config
    dominant = config.get("dominant", "en")
    table: dict[str, dict[str, Any]] = {lang: {} for lang in config.get("languages", [])}
    columns: dict[str, None] = {}  # in the order first seen

    def put(lang: str, column: str, value: Any) -> None:
        if _is_number(value):
            table.setdefault(lang, {}).setdefault(column, value)
            columns.setdefault(column)

    pairs = _stats(run, k, "pairs")
    for lang, n in (pairs.get("pairs_per_language") or {}).items():
        put(lang, "pairs", n)
    for lang, ids in (pairs.get("dropped") or {}).items():
        put(lang, "prompts without a pair", len(ids) if isinstance(ids, list) else ids)
    for direction, n in (_stats(run, k, "translate").get("failed") or {}).items():
        source, _, target = direction.partition("->")
        if source == dominant:
            put(target, f"failed translations {dominant}->X", n)
        elif target == dominant:
            put(source, f"failed translations X->{dominant}", n)
    languages = set(table)
    for stage in run.done_stages(k):  # then every table of numbers by language a stage recorded
        prefix = "" if stage == "pairs" else f"{stage} "
        for key, by_lang in _language_tables(_stats(run, k, stage), languages):
            for lang, value in by_lang.items():
                if key:  # {lang: number}
                    put(lang, prefix + key.replace("_", " "), value)
                    continue
                for name, v in (value if isinstance(value, Mapping) else {}).items():
                    if isinstance(v, Mapping):  # e.g. drops by reason: their total
                        v = sum(x for x in v.values() if _is_number(x))
                    put(lang, prefix + name.replace("_", " "), v)
    if run.is_done(k, "check"):
        check = run.outputs(k, "check")
        held = check.get("held_out") or {}
        for name, column in (("in_language", "held-out in-language share"), ("mean_tokens", "held-out mean tokens")):
            for lang, value in (held.get(name) or {}).items():
                put(lang, column, value)
        for metric, values in (check.get("evaluation") or {}).items():
            for lang, value in (values if isinstance(values, Mapping) else {}).items():
                put(lang, metric, value)
    # Every language gets every column (None where nothing was measured), in one order.
    return {lang: {c: numbers.get(c) for c in columns} for lang, numbers in table.items() if numbers}


def card_info(run: RunDir, k: int) -> dict[str, Any]:
    """What the model card of iteration k's export says (`lidr_jax.formats.export.model_card`)."""
    config = run.config
    info: dict[str, Any] = {
        "base_model": base_model_name(run),
        "method": METHODS.get(config.get("reward", "lidr"), str(config.get("reward"))) if k else _NOT_TRAINED,
        "iteration": k,
        "languages": list(config.get("languages", [])),
        "run": str(run.path),
    }
    if k:
        pairs = _stats(run, k, "pairs").get("pairs", _stats(run, k, "reference").get("pairs"))
        if _is_number(pairs):
            info["training_pairs"] = pairs
    per_language = per_language_numbers(run, k)
    if per_language:
        info["per_language"] = per_language
    held_out = held_out_card(run.outputs(k, "check").get("held_out") or {}) if run.is_done(k, "check") else {}
    if held_out:
        info["held_out"] = held_out
    return info


# ------------------------------------------------------------------------------------------- CLI


def _size(text: str) -> str:
    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lidr_jax.export",
        description="Export a model to a Hugging Face directory (safetensors, config, generation config, "
        "tokenizer with chat template, README.md model card) that transformers and vLLM load.",
    )
    p.add_argument(
        "source",
        help="a run directory (has manifest.json), a Hugging Face model directory, "
        "a .gguf file, or an embedded model name (smollm2-135m-instruct)",
    )
    p.add_argument(
        "--iteration",
        type=int,
        default=None,
        help="run directories only: the iteration whose trained policy to export "
        "(default: the last trained; 0 = the run's starting model)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder: new, empty, or an earlier lidr_jax export (with --force); anything else is refused",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier lidr_jax export at --out")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="bfloat16", help="weight dtype (default bfloat16)")
    p.add_argument("--max-shard-size", type=_size, default="2GB", help="largest safetensors file (default 2GB)")
    return p


def check_out(out: str, run_path: AnyPath | None) -> None:
    """--out is not empty, can be created (nothing on its way is a file), and is not inside the run being
    exported: the run's own export folders are its stages' (its manifest records what they hold), so
    an export there would leave the manifest saying something else."""
    if not out.strip():
        raise ExportError("--out is empty, which would write into the current folder; pass a new folder")
    path = Path(out).expanduser().absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(
            f"export destination {out} cannot be created: {parent} is a file; nothing was written: choose a folder"
        )
    if isinstance(run_path, Path) and run_path.resolve() in path.resolve().parents:
        raise ExportError(
            f"export destination {out} is inside the run directory {run_path}, whose folders belong to its stages "
            "(its manifest records what they hold); nothing was written: choose a folder outside the run"
        )


def export_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # Every check first (no model is loaded until all pass), then the one slow part.
    is_run = (as_path(args.source) / MANIFEST).exists()
    if is_run:
        run = open_run(args.source)
        k = trained_iteration(run, args.iteration)
        protect = [run.path]
        base = base_model_name(run)
        if Path(base).expanduser().exists():
            protect.append(model_path(base))
        if k:
            protect.append(policy_path(run, k))
        card = card_info(run, k)
    else:
        if args.iteration is not None:
            parser.error("--iteration applies only to a run directory (one with manifest.json)")
        protect, card = [model_path(args.source)], {"base_model": args.source, "method": CONVERSION}
    check_out(args.out, run.path if is_run else None)
    check_destination(args.out, sources=protect, replace=args.force)

    model = model_from_run(args.source, args.iteration) if is_run else load_pretrained(args.source)
    out = export_hf(
        model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, card=card, replace=args.force
    )
    files = sorted(f.name for f in out.iterdir())
    print(f"exported {model.source} ({args.dtype}) to {out}: {', '.join(files)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return export_command(args, parser)
    except (ExportError, StageNotDoneError, *LOAD_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
