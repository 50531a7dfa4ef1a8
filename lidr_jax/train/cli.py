"""`python -m lidr_jax.dpo`: DPO-train a model on a user's preference-pair file.

    python -m lidr_jax.dpo --model PATH --pairs FILE --out DIR [--set key=value ...] [--reference PATH]

Writes into DIR: `model/` (a Hugging Face directory of the trained policy), `metrics.jsonl` (one line
per optimizer step, TRL metric names), `reference_logps.npz` (the reference pass, reused by a rerun
on the same pairs and settings) and `dpo_config.json` (the settings used).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from lidr_jax.settings import SettingsError, apply_overrides, describe, from_dict
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.pairs import PairFormatError, encode_pairs, read_pairs

EPILOG = """settings (--set key=value; values parse as YAML):
{settings}

pair files: JSONL or a JSON list; TRL records (prompt/chosen/rejected, strings or chat message lists;
`reject` is accepted for `rejected`; extra keys are kept) or LLaMA-Factory alpaca ranking records
(instruction/input/output: [chosen, rejected], or instruction/input/chosen/rejected).
"""


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m lidr_jax.dpo",
        description="DPO (+ length-averaged NLL on chosen) training of a model on preference pairs. The "
        "reference is the starting model unless --reference names another.",
        epilog=EPILOG.format(settings=describe(DPOConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="HF model directory, .gguf file or 'smollm2-135m-instruct'")
    parser.add_argument("--pairs", required=True, help="preference pairs (.jsonl or .json)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--reference", default=None, help="reference model (default: --model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a DPOConfig setting")
    parser.add_argument(
        "--export-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of the written weights (float32 keeps updates smaller than bf16 resolution)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def settings_from_overrides(overrides: list[str]) -> DPOConfig:
    """DPOConfig from `key=value` items; an unknown key or a bad value raises SettingsError naming it.

    YAML 1.1 reads `5e-7` (no dot) as a string; for float settings such a string is read as a number.
    """
    data = apply_overrides({}, overrides)
    float_fields = {f.name for f in dataclasses.fields(DPOConfig) if f.type in (float, "float")}
    for key, value in data.items():
        if key in float_fields and isinstance(value, str):
            try:
                data[key] = float(value)
            except ValueError:
                pass  # from_dict names the key and the bad value
    return from_dict(DPOConfig, data)


def _write_model(model, params, out_dir: Path, dtype: str) -> Path:
    from lidr_jax.formats.export import export_hf

    return export_hf(dataclasses.replace(model, params=params), out_dir, dtype=dtype)


def run(args) -> int:
    import jax

    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.train.trainer import (
        NonFiniteLossError,
        load_reference,
        reference_logprobs,
        save_reference,
        total_steps,
        train,
    )

    cfg = settings_from_overrides(args.set)
    pairs = read_pairs(args.pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    model = load_pretrained(args.model)
    enc = encode_pairs(pairs, model.tokenizer, cfg.max_prompt_len, cfg.max_response_len)
    print(f"pairs: {enc.summary()}; {total_steps(len(enc), cfg)} optimizer steps", file=sys.stderr)

    ref_file = out / "reference_logps.npz"
    ref = None
    if ref_file.exists():
        try:
            ref = load_reference(ref_file, enc)
            print(f"reference log-probs: reusing {ref_file}", file=sys.stderr)
        except ValueError as e:
            print(f"reference log-probs: recomputing ({e})", file=sys.stderr)
    if ref is None:
        if args.reference:
            reference = load_pretrained(args.reference)
            if reference.config.vocab_size != model.config.vocab_size:
                raise ValueError(
                    f"--reference {args.reference} has vocabulary {reference.config.vocab_size}, "
                    f"the model {model.config.vocab_size}: the reference must share the tokenizer"
                )
            ref = reference_logprobs(reference.params, reference.config, enc, cfg, progress=not args.quiet)
            del reference  # one model resident during training
        else:
            ref = reference_logprobs(model.params, model.config, enc, cfg, progress=not args.quiet)
        save_reference(ref_file, ref, enc)

    metrics_file = out / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    try:
        state = train(
            model.params,
            model.config,
            enc,
            ref,
            cfg,
            metrics_path=metrics_file,
            pad_id=model.tokenizer.pad_token_id,
            progress=not args.quiet,
        )
    except NonFiniteLossError as e:
        print(f"error: {e}\nNo model was written; metrics up to the failure are in {metrics_file}.", file=sys.stderr)
        return 3
    written = _write_model(model, jax.device_get(state.params), out / "model", args.export_dtype)
    print(f"trained model: {written}\nmetrics: {metrics_file}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (SettingsError, PairFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
