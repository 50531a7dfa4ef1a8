"""`python -m lidr_jax.iterate`: LIDR or ICR self-improvement iterations, end to end, resumable.

    python -m lidr_jax.iterate                                   # the packaged default.yaml: embedded SmolLM2
    python -m lidr_jax.iterate --config configs/lidr_llama3_8b.yaml --set dpo.beta=0.2
    python -m lidr_jax.iterate --run-dir runs/mine --set iterations=3
    python -m lidr_jax.iterate --run-dir runs/mine --redo iter_1/train   # forget a stage and what follows

Each reward strategy is a chain of stages, a list of `(name, stage)` in `CHAINS`; a stage is a function
of the iteration (lidr_jax.pipeline.iteration) whose artifacts live in `RUN_DIR/iter_K/<name>/` and
whose completion is recorded in `RUN_DIR/manifest.json`. Rerunning the same command skips finished
stages (rerunning one whose recorded files are gone) and resumes an unfinished one from its last chunk
or checkpoint. Everything that can be checked without a model (settings, prompt files, every model's
files, an endpoint translator's key and host, every row of the evaluation data, the run directory) is
checked before the run directory is created or written. A run directory is new, empty, or an earlier
run (its manifest.json); a folder holding anything else is refused, naming a file in it. A start refused
before any stage finished (a model that fails only when it loads) removes the run directory it created,
so the corrected command starts afresh.

Errors a user can fix (`INPUT_ERRORS`) end the command with a one-line message on stderr and exit
code 2; any other error is a bug and shows its traceback.

Several processes (one per host) run the same command with the same config and seed; process 0
writes the run directory and the others follow stage by stage (lidr_jax.parallel.multihost, docs/scaling.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path

import yaml

from lidr_jax.endpoint import EndpointRequestError, EndpointUnreachableError, check_reachable
from lidr_jax.files import as_path, plain
from lidr_jax.formats.load import LOAD_ERRORS, check_model_files
from lidr_jax.methods.languages import UnknownLanguageError
from lidr_jax.methods.prompt_sets import (
    PromptSet,
    PromptSetError,
    PromptSourceConfig,
    iteration_slice,
    load_prompts,
    split_heldout,
)
from lidr_jax.parallel import sharding
from lidr_jax.parallel.compile_cache import enable_compilation_cache
from lidr_jax.parallel.multihost import maybe_initialize_distributed, run_processes
from lidr_jax.pipeline.check import check_stage, has_checks
from lidr_jax.pipeline.config import DEFAULT_CONFIG, RunConfig, check_model, check_paths, load_run_config
from lidr_jax.pipeline.icr_stages import icr_pairs, icr_sample, icr_score
from lidr_jax.pipeline.iteration import Iteration, Stage, start_model
from lidr_jax.pipeline.lidr_stages import lidr_generate, lidr_pairs, lidr_translate
from lidr_jax.pipeline.models import RunModels
from lidr_jax.pipeline.pair_output import NoPairsError
from lidr_jax.pipeline.plan import check_fits_at_load
from lidr_jax.pipeline.report import print_summary, write_report
from lidr_jax.pipeline.run_dir import MANIFEST, RunConfigMismatchError, RunDir, RunDirError
from lidr_jax.pipeline.train_stages import (
    MetricsFileError,
    TrainingDivergedError,
    export_stage,
    reference_stage,
    train_stage,
)
from lidr_jax.settings import SettingsError, check_finite, describe
from lidr_jax.train.memory import DoesNotFitError
from lidr_jax.train.pairs import PairFormatError

TRAINING: list[tuple[str, Stage]] = [
    ("reference", reference_stage),
    ("train", train_stage),
    ("export", export_stage),
    ("check", check_stage),
]
CHAINS: dict[str, list[tuple[str, Stage]]] = {
    "lidr": [("generate", lidr_generate), ("translate", lidr_translate), ("pairs", lidr_pairs), *TRAINING],
    "icr": [("sample", icr_sample), ("score", icr_score), ("pairs", icr_pairs), *TRAINING],
}
BASELINE: list[tuple[str, Stage]] = [("check", check_stage)]  # iteration 0: the starting model
ENDPOINT_CONNECT_S = 10.0  # the TCP connect test of an endpoint translator, before the run starts

# Errors whose message names the cause and the fix: the command prints it and exits with code 2.
INPUT_ERRORS = (
    SettingsError,
    PromptSetError,
    UnknownLanguageError,
    *LOAD_ERRORS,  # a model that cannot be loaded (each names its file)
    EndpointUnreachableError,  # an endpoint translator that cannot be reached
    EndpointRequestError,
    RunDirError,
    NoPairsError,
    PairFormatError,
    TrainingDivergedError,
    MetricsFileError,
    DoesNotFitError,  # the fit check (lidr_jax.train.memory): names the numbers and the fixes
)


def check_prompt_path(source: PromptSourceConfig) -> None:
    """A prompt source that cannot be one, said as it is: a path that does not exist, or a single file
    without a way to tell its languages apart (`language_column`, or {lang} in the path)."""
    if source.path == "default":
        return
    per_language = any("{lang}" in (v or "") for v in (source.path, source.data_files, source.name, source.split))
    if per_language or source.language_column is not None:
        return
    path = Path(source.path).expanduser()
    if not path.exists():
        raise SettingsError(
            f"prompts.path: {source.path!r} does not exist; give a folder of {{lang}}.jsonl files (or a data "
            "file with prompts.language_column set)"
        )
    if not path.is_dir():
        raise SettingsError(
            f"prompts.path: {source.path} is a file, not a folder of {{lang}}.jsonl files; a single file needs "
            "prompts.language_column (its column of language codes), or put {lang} in the path (one file per language)"
        )


def check_run_inputs(cfg: RunConfig) -> None:
    """Every model the run will load, checked as far as it can be without loading it (`check_model_files`),
    and, on a fresh start, every endpoint it will call (API key variable, a TCP connect bounded by
    `ENDPOINT_CONNECT_S`; the URL itself is checked when the config loads): before the run directory exists,
    so a refused start leaves nothing behind. A resumed run is not asked for the network: its endpoint
    answers may all be cached."""
    models = [(cfg.model, "model")]
    if cfg.reward == "icr":
        models += [(getattr(cfg.icr, k), f"icr.{k}") for k in ("dpo_model", "reference_model")]
    translator = cfg.lidr.translator
    if cfg.reward == "lidr" and translator.kind == "model":
        models.append((translator.model, "lidr.translator.model"))
    for spec, setting in models:
        if spec is not None:
            if setting != "model":
                check_model(spec, setting)  # the same words as the policy's check for a path that is not there
            check_model_files(spec, setting)
    fresh = not (as_path(cfg.run_dir) / MANIFEST).is_file()  # a resumed run may have every answer cached
    if cfg.reward == "lidr" and translator.kind == "endpoint" and fresh:
        check_reachable(translator.endpoint, "lidr.translator.endpoint", ENDPOINT_CONNECT_S)


def plan_prompts(cfg: RunConfig) -> tuple[list[PromptSet], PromptSet | None]:
    """Load and validate the prompts; (per-iteration prompt slices, held-out prompts)."""
    check_prompt_path(cfg.prompts)
    prompts = load_prompts(cfg.prompts)
    missing = [lang for lang in cfg.languages if lang not in prompts.languages]
    if missing:
        raise SettingsError(f"the prompt set {prompts.source} has no prompts for {missing}")
    held = None
    if cfg.plan.held_out:
        prompts, held = split_heldout(prompts, cfg.plan.held_out, seed=cfg.seed)
    slices = []
    for k in range(cfg.iterations):
        index = k if cfg.plan.fresh_per_iteration else 0
        slices.append(iteration_slice(prompts, index, cfg.plan.per_iteration, cfg.plan.offset))
    return slices, held


class Runner:
    """Runs the strategy's chain of stages for every iteration, skipping finished ones."""

    def __init__(
        self, cfg: RunConfig, run: RunDir, models: RunModels, slices: list[PromptSet], held_out: PromptSet | None
    ):
        self.cfg, self.run, self.models = cfg, run, models
        self.slices, self.held_out = slices, held_out

    def run_chain(self, it: Iteration, chain: list[tuple[str, Stage]]) -> None:
        """Each stage of `chain` not yet done (or done but with recorded files gone), in order."""
        for name, stage in chain:
            if self.run.is_done(it.k, name):
                missing = self.run.from_writer(self.run.missing_outputs, it.k, name)  # as the writer sees it
                if not missing:
                    continue
                print(f"[iteration {it.k}] {name}: recorded as done but {missing[0]} is gone; running it again")
                self.run.forget(it.k, name)
            print(f"[iteration {it.k}] {name}")
            self.run.mark_done(it.k, name, stage(it))

    def iteration(self, k: int) -> Iteration:
        return Iteration(self.cfg, self.run, k, self.models, self.slices[k - 1] if k else None, self.held_out)

    def run_all(self) -> None:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # progress on stderr; the results and paths below on stdout
            print(f"devices: {sharding.describe_mesh(self.models.mesh)}")
            with sharding.use_mesh(self.models.mesh, self.models.rules):
                if has_checks(self.cfg, self.held_out):
                    self.run_chain(self.iteration(0), BASELINE)
                for k in range(1, self.cfg.iterations + 1):
                    self.run.set_iteration_start_model(k, start_model(self.cfg, self.run, k))
                    self.run_chain(self.iteration(k), CHAINS[self.cfg.reward])
            self.run.close()
            report = self.run.on_writer(write_report, self.cfg, self.run)
        self.run.on_writer(print_summary, self.cfg, self.run)
        print(f"\ndone in {time.perf_counter() - t0:.0f} s" + (f"; report: {report}" if report else ""))


def open_run(cfg: RunConfig, allow_config_change: bool = False, redo: list[str] = ()) -> Runner:
    """Every check that needs no model, then the run directory (created or resumed), the stages to redo
    forgotten, and the model loader; the models themselves load when a stage first needs them."""
    slices, held_out = plan_prompts(cfg)
    check_paths(cfg)
    check_run_inputs(cfg)
    targets = [parse_redo(item, cfg) for item in redo]
    if targets and not (as_path(cfg.run_dir) / MANIFEST).is_file():
        raise SettingsError(f"--redo: {cfg.run_dir} holds no run yet, so there is nothing to redo; drop --redo")
    enable_compilation_cache(cfg.compilation_cache)  # before anything compiles
    mesh = sharding.make_mesh(cfg.mesh)
    check_fits_at_load(cfg, mesh)  # a DPO step the mesh cannot hold fails now, with the compiler's numbers
    rules = sharding.parse_rules(cfg.mesh.rules)
    run = RunDir(
        cfg.run_dir,
        config=plain(cfg),
        seed=cfg.seed,
        allow_config_change=allow_config_change,
        processes=run_processes(),
        ignore=("run_dir", "metrics", "compilation_cache"),  # where it lives, reports, caches: not what it computes
        metrics=cfg.metrics,  # each finished stage's numbers to TensorBoard / W&B
    )
    for k, name in targets:
        if not run.is_done(k, name) and run.stage_dir(k, name, create=False).exists():
            print(f"--redo iter_{k}/{name}: the stage was not finished; deleting its files to run it from the start")
            run.redo([(k, name)])  # a damaged unfinished stage (e.g. its metrics file): start it over
        elif not run.is_done(k, name):
            raise SettingsError(
                f"--redo iter_{k}/{name}: that stage is not done in {run.path} (done: {run.done_stages(k) or 'none'}); "
                "rerun without --redo to finish it"
            )
        run.redo(redo_plan(cfg, run, k, name))
    return Runner(cfg, run, RunModels(cfg.model, cfg.dtype, mesh, rules), slices, held_out)


def parse_redo(item: str, cfg: RunConfig) -> tuple[int, str]:
    """`iter_K/STAGE` -> (K, STAGE), checked against the run's chain."""
    k, _, name = item.strip("/").partition("/")
    stages = [n for n, _ in (BASELINE if k == "iter_0" else CHAINS[cfg.reward])]
    if not k.startswith("iter_") or not k[5:].isdigit() or name not in stages or int(k[5:]) > cfg.iterations:
        raise SettingsError(
            f"--redo {item!r}: expected iter_K/STAGE with K in 0..{cfg.iterations} and STAGE one of {stages} "
            f"(reward={cfg.reward}), e.g. --redo iter_1/train"
        )
    return int(k[5:]), name


def redo_plan(cfg: RunConfig, run: RunDir, k: int, name: str) -> list[tuple[int, str]]:
    """What redoing stage `name` of iteration `k` forgets: that stage, the later stages of its iteration,
    and, when the iteration's trained policy changes (a stage up to train), every later iteration."""
    chain = [n for n, _ in (BASELINE if k == 0 else CHAINS[cfg.reward])]
    plan = [(k, n) for n in chain[chain.index(name) :] if run.is_done(k, n)]
    if k >= 1 and chain.index(name) <= chain.index("train"):
        plan += [(later, n) for later in run.iterations() if later > k for n in run.done_stages(later)]
    return plan


def build_parser() -> argparse.ArgumentParser:
    settings_help = describe(load_run_config())  # the values a bare run uses (default.yaml), not the classes'
    p = argparse.ArgumentParser(
        prog="python -m lidr_jax.iterate",
        description="Multilingual self-improvement (LIDR or ICR iterative DPO), end to end and resumable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings (YAML keys, each with the value a bare run uses: the packaged default.yaml over the "
        "settings' defaults; override any with --set group.key=value):\n" + settings_help,
    )
    p.add_argument("--config", help=f"YAML config (default: the packaged {DEFAULT_CONFIG.name})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set dpo.beta=0.2 --set languages=[en,fr]",
    )
    p.add_argument("--run-dir", help="run directory (overrides run_dir); rerun the same command to resume")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run directory even though its recorded config differs",
    )
    p.add_argument(
        "--redo",
        action="append",
        default=[],
        metavar="iter_K/STAGE",
        help="run a finished stage again, and every stage after it (its files are deleted first)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--verbose", action="store_true", help="also show W&B's own messages")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["LIDR_JAX_VERBOSE"] = "1"  # lidr_jax.train.metrics shows W&B's lines
    try:
        maybe_initialize_distributed()  # multi-host runs: before anything touches a device
        cfg = load_run_config(args.config, args.overrides, args.run_dir)
        check_finite(cfg)  # dpo.learning_rate=.inf and the like: refused before anything
        if args.print_config:
            text = yaml.safe_dump(plain(cfg), sort_keys=False, allow_unicode=True)
            print(re.sub(r"(url: \S*?//[^/\s:@]*:)[^/\s@]*@", r"\1***@", text))  # endpoint passwords masked
            return 0
        runner = open_run(cfg, allow_config_change=args.allow_config_change, redo=args.redo)
        try:
            runner.run_all()
        except INPUT_ERRORS:
            if runner.run.discard_unused():  # nothing was done: the corrected command starts afresh
                print(f"nothing was done, so the new run directory {runner.run.path} was removed")
            raise
    except RunConfigMismatchError as e:  # a list of keys: one per line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except INPUT_ERRORS as e:
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
