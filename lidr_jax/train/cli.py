"""`python -m lidr_jax.dpo`: DPO-train a model on a user's preference-pair file, with the pipeline's trainer.

    python -m lidr_jax.dpo --model PATH --pairs FILE --out DIR [--config FILE.yaml] [--set key=value ...]

Settings (`DPORunConfig`) come from an optional YAML file, then `--set` items: `dpo.beta=0.2`,
`mesh.preset=fsdp`, `metrics.report_to=[tensorboard,wandb]`, `checkpoint_every=20`. A bare DPO setting
(`beta=0.2`) means `dpo.beta`. The YAML uses the same groups as the pipeline's config (`dpo:`, `mesh:`),
so a pipeline config's groups can be copied as they are.

Writes into DIR: `model/` (a Hugging Face directory of the trained policy, bfloat16 unless
`export_dtype: float32`), `metrics.jsonl` (one line per optimizer step, TRL metric names),
`tensorboard/` (scalars written every step while training runs; W&B too when asked for),
`checkpoints/` (Orbax, every `checkpoint_every` steps), `reference_logps.npz` (the reference pass,
reused by a rerun on the same pairs and settings) and `dpo_config.json` (the settings used).

Before any model loads or anything is written, every input is checked (`check_inputs`): the pair file
(a bad record is one line naming file and line), the model and reference (their files as the pipeline
checks its models: remote code, truncated safetensors, tokenizer files), and DIR: new, empty, or an
earlier run of this command (recognised by its dpo_config.json), never a folder of anything else, and
DIR/model new or an earlier export of this command. Settings that are not finite numbers (a learning
rate of inf) are refused, and weights that end training non-finite are not exported (one line, exit
code 2). Pairs whose chosen answer is empty or equals the
rejected one (after stripping whitespace) teach DPO no preference: they are counted in a one-line
warning naming their lines and left out, as the pipeline's pair filters do (`drop_degenerate_pairs:
false` trains on them, as TRL does silently). Bad input exits with code 2 and one `error:` line.

Killed and rerun with the same command, training continues from the last checkpoint and ends with the
parameters an uninterrupted run reaches (the data order is a function of the step). A rerun with
other settings on the same DIR is refused, so two runs' steps never mix.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import jax

from lidr_jax.files import atomic_write_json, plain
from lidr_jax.formats.export import EXPORT_DTYPES, ExportDtype, ExportError, check_destination, export_hf
from lidr_jax.formats.load import LOAD_ERRORS, check_model_files, load_pretrained, model_path
from lidr_jax.model.llama import param_specs
from lidr_jax.parallel import sharding
from lidr_jax.parallel.multihost import maybe_initialize_distributed
from lidr_jax.parallel.sharding import MeshConfig
from lidr_jax.settings import (
    SettingsError,
    apply_overrides,
    check_finite,
    check_settings,
    describe,
    from_dict,
    load_yaml,
    setting,
)
from lidr_jax.train import autotune, trainer
from lidr_jax.train.checkpoint import TrainCheckpointer
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.metrics import MetricsConfig, MetricsSink, truncate_metrics
from lidr_jax.train.pairs import PairFormatError, encode_pairs, read_training_pairs

RUN_MARK = "dpo_config.json"  # written first into --out: a folder holding it is a run of this command


class TrainingDivergedError(ValueError):
    """Training ended with weights that are not finite; nothing was exported."""


@dataclasses.dataclass(frozen=True)
class DPORunConfig:
    """Everything `python -m lidr_jax.dpo` runs with (YAML groups and `--set` keys)."""

    dpo: DPOConfig = setting(DPOConfig(), "the DPO settings (a bare key on the command line means dpo.KEY)")
    mesh: MeshConfig = setting(MeshConfig(), "fsdp over every device (one device: no sharding)")
    metrics: MetricsConfig = setting(MetricsConfig(), "live TensorBoard (and W&B when asked for)")
    checkpoint_every: int = setting(50, "optimizer steps between Orbax checkpoints (and one at the end)", ge=1)
    checkpoint_keep: int = setting(2, "the newest checkpoints kept", ge=1)
    export_dtype: ExportDtype = setting("bfloat16", "bfloat16 (what vLLM serves, half the size) | float32 (exact)")
    drop_degenerate_pairs: bool = setting(True, "leave out (counted) pairs with empty chosen or chosen == rejected")

    def __post_init__(self):
        check_settings(self)


EPILOG = """settings (YAML groups or --set key=value; values parse as YAML; a bare DPO key means dpo.KEY):
{settings}

pair files: JSONL or a JSON list; TRL records (prompt/chosen/rejected, strings or chat message lists;
`reject` is accepted for `rejected`; extra keys are kept) or LLaMA-Factory alpaca ranking records
(instruction/input/output: [chosen, rejected], or instruction/input/chosen/rejected).
"""


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m lidr_jax.dpo",
        description="DPO (+ length-averaged NLL on chosen) training of a model on preference pairs, with the "
        "pipeline's trainer: device mesh, Orbax checkpoints with exact resume, live metrics. The reference is "
        "the starting model unless --reference names another.",
        epilog=EPILOG.format(settings=describe(DPORunConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="HF model directory, .gguf file or 'smollm2-135m-instruct'")
    parser.add_argument("--pairs", required=True, help="preference pairs (.jsonl or .json)")
    parser.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--reference", default=None, help="reference model (default: --model)")
    parser.add_argument("--config", default=None, help="YAML file of settings (groups dpo, mesh, metrics, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, e.g. dpo.beta=0.2")
    parser.add_argument(
        "--export-dtype",
        default=None,
        choices=EXPORT_DTYPES,
        help="dtype of the written weights (default: the export_dtype setting, bfloat16)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="also show W&B's own messages")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["LIDR_JAX_VERBOSE"] = "1"  # lidr_jax.train.metrics shows W&B's lines
    return args


def load_settings(config_path: str | None, overrides: list[str]) -> DPORunConfig:
    """DPORunConfig from a YAML file and `key=value` items; an unknown key or a bad value raises
    SettingsError naming it.

    YAML 1.1 reads `5e-7` (no dot) as a string; for float settings such a string is read as a number.
    """
    data = load_yaml(config_path) if config_path else {}
    run_fields = {f.name for f in dataclasses.fields(DPORunConfig)}
    dpo_fields = {f.name for f in dataclasses.fields(DPOConfig)}
    items = []
    for item in overrides:
        key = item.split("=", 1)[0].strip().split(".")[0]  # compute.logprob_chunk=16 means dpo.compute...
        items.append(f"dpo.{item.strip()}" if key in dpo_fields and key not in run_fields else item)
    data = apply_overrides(data, items)
    dpo = data.get("dpo")
    if isinstance(dpo, dict):
        floats = {f.name for f in dataclasses.fields(DPOConfig) if f.type in (float, "float")}
        for key, value in dpo.items():
            if key in floats and isinstance(value, str):
                with contextlib.suppress(ValueError):  # else from_dict names the key and the bad value
                    dpo[key] = float(value)
    cfg = from_dict(DPORunConfig, data)
    check_finite(cfg)  # dpo.learning_rate=inf would export NaN weights
    return cfg


def _crash_point(step: int) -> None:
    """Fault injection for the kill-and-resume test: `LIDR_JAX_CRASH_AT=dpo:<step>` makes the process
    SIGKILL itself after that step's checkpoint, as a preempted machine stops (no cleanup)."""
    if os.environ.get("LIDR_JAX_CRASH_AT") == f"dpo:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _check_same_run(path: Path, saved_for: dict) -> None:
    """A DIR whose checkpoints were made with other settings or data is refused (resuming would mix two
    runs' steps)."""
    if not path.exists():
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(k for k in set(before) | set(saved_for) if k != "run" and before.get(k) != saved_for.get(k))
    if changed:
        raise SettingsError(
            f"{path.parent} holds checkpoints of a run with other {', '.join(changed)}; rerun with the same "
            f"settings to resume, use another --out, or delete {path.parent / 'checkpoints'} to start over"
        )


def _card(args, cfg: DPORunConfig, pairs) -> dict:
    languages = sorted({str(p.extra.get("language") or p.extra.get("lang")) for p in pairs} - {"None"})
    return dict(
        base_model=args.model,
        method=f"DPO ({cfg.dpo.loss_type}, beta {cfg.dpo.beta}) + NLL on chosen (weight {cfg.dpo.nll_weight}), "
        "python -m lidr_jax.dpo",
        training_pairs=len(pairs),
        languages=languages,
    )


def check_inputs(args, cfg: DPORunConfig) -> list:
    """Every input, checked before any model loads or anything is written: the pair file (the pairs to
    train on are returned, a warning printed for those left out), the model and reference paths, and
    --out (a folder, whose model/ is a new folder or an earlier export of this command)."""
    pairs, warning = read_training_pairs(args.pairs, cfg.drop_degenerate_pairs)
    if warning and jax.process_index() == 0:
        print(warning, file=sys.stderr)
    sources = [model_path(args.model)] + ([model_path(args.reference)] if args.reference else [])
    check_out(args.out)
    check_destination(Path(args.out) / "model", sources=sources, replace=True)
    for flag, spec in (("--model", args.model), ("--reference", args.reference)):
        if spec:
            check_model_files(spec, flag)  # remote code, truncated weights, tokenizer files: before any work
    return pairs


def check_out(path: str) -> None:
    """--out is a new folder (creatable: nothing on its way is a file), an empty one, or one an earlier run
    of this command wrote (recognised by its dpo_config.json); a non-empty folder of anything else is
    someone else's and is refused, naming a file in it, so that nothing of theirs is overwritten or
    appended to."""
    if not path.strip():
        raise SettingsError(
            "--out is empty, which would write into the current folder; pass a folder, e.g. --out runs/dpo"
        )
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out} is a file; pass a folder (a new one, or the one an earlier run wrote)")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SettingsError(f"--out {out} cannot be created: {parent} is a file; pass a folder path under a folder")
    if out.is_dir() and not (out / RUN_MARK).is_file():
        entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(f".{RUN_MARK}."))  # cut by a kill
        if entries:
            more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
            raise SettingsError(
                f"--out {out} is not empty and not an earlier run of this command (no {RUN_MARK}): it holds "
                f"{entries[0]}{more}; nothing was written: pass a new or empty folder"
            )


def first_nonfinite(params) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None when every weight is finite."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not bool(jax.numpy.isfinite(leaf).all()):
            return jax.tree_util.keystr(path)
    return None


def check_finite_weights(params, out: Path) -> None:
    """Weights with a NaN or an infinity are not exported: one line naming the first such tensor."""
    name = first_nonfinite(params)
    if name is not None:
        raise TrainingDivergedError(
            f"the trained weights are not finite ({name} holds NaN or inf) although every loss was; no model "
            f"was written to {out / 'model'}: rerun on a new --out with a lower dpo.learning_rate"
        )


def run(args) -> int:
    cfg = load_settings(args.config, args.set)
    export_dtype = args.export_dtype or cfg.export_dtype
    pairs = check_inputs(args, cfg)
    out = Path(args.out)
    writer = jax.process_index() == 0
    identity = {
        "model": args.model,
        "reference": args.reference,
        "pairs": str(Path(args.pairs).absolute()),
        "dpo": plain(cfg.dpo),
        "run": plain(cfg),
    }
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        _check_same_run(out / RUN_MARK, identity)
    if writer:
        atomic_write_json(out / RUN_MARK, identity)

    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.parse_rules(cfg.mesh.rules)
    with sharding.use_mesh(mesh, rules):
        model = load_pretrained(args.model)
        specs = param_specs(model.config)
        model = dataclasses.replace(model, params=sharding.place_params(model.params, specs, mesh, rules))
        enc = encode_pairs(pairs, model.tokenizer, cfg.dpo.max_prompt_len, cfg.dpo.max_response_len, cfg.dpo.row_tokens)
        num_steps = trainer.total_steps(len(enc), cfg.dpo)
        print(f"pairs: {enc.summary()}; {num_steps} optimizer steps; {sharding.describe_mesh(mesh)}", file=sys.stderr)
        ref = _reference(args, cfg, model, enc, out / "reference_logps.npz", mesh, rules, writer)

        optimizer = trainer.make_optimizer(cfg.dpo, num_steps)
        abstract = jax.eval_shape(lambda p: trainer.init_state(p, optimizer), model.params)
        metrics_file = out / "metrics.jsonl"
        state = None
        with TrainCheckpointer(ckpt_dir, every=cfg.checkpoint_every, keep=cfg.checkpoint_keep) as ckpt:
            restored = ckpt.restore_latest(abstract, sharding.state_shardings(abstract, specs, mesh, rules))
            start = 0
            if restored is not None:
                state, start = restored[0], int(restored[0].step)
                print(f"resuming from the checkpoint at step {start} of {num_steps}", file=sys.stderr)
            if writer:
                truncate_metrics(metrics_file, start)  # lines logged after the checkpoint are logged again

            sink = MetricsSink(
                cfg.metrics if writer else MetricsConfig(report_to=()),
                jsonl_path=metrics_file if writer else None,
                tensorboard_dir=out / "tensorboard",
                run_name=out.name,
                run_config=identity["run"],
                purge_step=start + 1,  # TensorBoard hides what a killed attempt logged past the checkpoint
            )
            try:
                state = autotune.train_checkpointed(
                    model,
                    enc,
                    ref,
                    cfg.dpo,
                    ckpt,
                    state=state,
                    sink=sink,
                    after_save=_crash_point,
                    progress=not args.quiet,
                )
            except trainer.NonFiniteLossError as e:
                print(
                    f"error: {e}\nNo model was written; the last good checkpoint is in {ckpt_dir} and the metrics "
                    f"up to the failure in {metrics_file}. Rerun with e.g. --set dpo.learning_rate="
                    f"{cfg.dpo.learning_rate / 10:g} on a new --out, or fix the data.",
                    file=sys.stderr,
                )
                return 3
        check_finite_weights(state.params, out)
        final = dataclasses.replace(model, params=state.params)
        written = export_hf(final, out / "model", dtype=export_dtype, card=_card(args, cfg, pairs), replace=True)
    print(f"trained model ({export_dtype}): {written}\nmetrics: {metrics_file}")  # results on stdout; progress: stderr
    return 0


def _reference(args, cfg: DPORunConfig, model, enc, ref_file: Path, mesh, rules, writer: bool):
    """Reference log-probs: reused from `ref_file` when they belong to these pairs, else computed (with
    --reference's weights, or the starting model's) and stored."""
    if ref_file.exists():
        try:
            ref = trainer.load_reference(ref_file, enc)
            print(f"reference log-probs: reusing {ref_file}", file=sys.stderr)
            return ref
        except ValueError as e:
            print(f"reference log-probs: recomputing ({e})", file=sys.stderr)
    progress = not args.quiet
    if args.reference:
        reference = load_pretrained(args.reference)
        if reference.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"--reference {args.reference} has vocabulary {reference.config.vocab_size}, "
                f"the model {model.config.vocab_size}: the reference must share the tokenizer"
            )
        params = sharding.place_params(reference.params, param_specs(reference.config), mesh, rules)
        ref = trainer.reference_logprobs(params, reference.config, enc, cfg.dpo, progress=progress)
        del reference, params  # one model resident during training
    else:
        ref = trainer.reference_logprobs(model.params, model.config, enc, cfg.dpo, progress=progress)
    if writer:
        trainer.save_reference(ref_file, ref, enc)
    return ref


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        maybe_initialize_distributed()  # several hosts: before anything touches a device
        return run(args)
    except (SettingsError, PairFormatError, ExportError, TrainingDivergedError, *LOAD_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
