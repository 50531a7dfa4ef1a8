"""`python -m lidr_jax.iterate`: LIDR or ICR self-improvement iterations, end to end, resumable.

    python -m lidr_jax.iterate                                   # configs/default.yaml: embedded SmolLM2
    python -m lidr_jax.iterate --config configs/lidr_llama3_8b_tpu.yaml --set dpo.beta=0.2
    python -m lidr_jax.iterate --run-dir runs/mine --set iterations=3

Each iteration is a chain of stages (lidr_jax.pipeline.lidr_stages, icr_stages, train_stages, check)
whose artifacts live in `RUN_DIR/iter_K/<stage>/` and whose completion is recorded in
`RUN_DIR/manifest.json`. Rerunning the same command skips finished stages and resumes an unfinished
one from its last chunk or checkpoint. All inputs (config, languages, prompt files) are checked
before any model is loaded.

Several processes (one per host) run the same command with the same config and seed; process 0
writes the run directory and the others follow stage by stage (lidr_jax.dist.multihost, docs/scaling.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from lidr_jax.dist.multihost import maybe_initialize_distributed
from lidr_jax.methods.prompt_sets import PromptSet, iteration_slice, load_prompts, split_heldout
from lidr_jax.model.llama import param_specs
from lidr_jax.pipeline.config import DEFAULT_CONFIG, RunConfig, load_run_config
from lidr_jax.settings import SettingsError, describe, to_dict

LIDR_STAGES = ("generate", "translate", "pairs", "reference", "train", "export")
ICR_STAGES = ("sample", "score", "pairs", "reference", "train", "export")


def plan_prompts(cfg: RunConfig) -> tuple[list[PromptSet], PromptSet | None]:
    """Load and validate the prompts; (per-iteration prompt slices, held-out prompts)."""
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
        slices.append(iteration_slice(prompts, index, cfg.plan.per_iteration))
    return slices, held


class Runner:
    """Holds the run directory and the base model; runs stages in order, skipping finished ones."""

    def __init__(self, cfg: RunConfig, allow_config_change: bool = False):
        from lidr_jax.dist.multihost import run_processes
        from lidr_jax.pipeline.run_dir import RunDir

        self.cfg = cfg
        self.slices, self.held_out = plan_prompts(cfg)  # before any model work
        self.run = RunDir(
            cfg.run_dir,
            config=to_dict(cfg),
            seed=cfg.seed,
            allow_config_change=allow_config_change,
            processes=run_processes(),
        )
        from lidr_jax.dist import sharding

        self.mesh = sharding.make_mesh(cfg.mesh)
        self.rules = sharding.parse_rules(cfg.mesh.rules)
        self._base = None

    # ----------------------------------------------------------------------------------- models
    @property
    def base(self):
        if self._base is None:
            from lidr_jax.formats.load import load_pretrained

            print(f"loading {self.cfg.model}")
            m = load_pretrained(self.cfg.model)
            self._base = self._placed(m, m.params, m.config)
        return self._base

    def _placed(self, model, params, config):
        """`model` with `params` placed per the mesh (each device gets only its shards) and the run's
        compute dtype."""
        from lidr_jax.dist import sharding

        params = sharding.place_params(params, param_specs(config), self.mesh, self.rules)
        return dataclasses.replace(model, params=params, config=config.replace(dtype=self.cfg.dtype))

    def policy(self, k: int):
        """The model iteration k starts from: the base model, or iteration k-1's trained policy."""
        if k == 1:
            self.run.set_iteration_start_model(k, self.cfg.model)
            return self.base
        prev = self.run.outputs(k - 1, "train")["policy"]
        self.run.set_iteration_start_model(k, prev)
        return self._load_params_into_base(prev)

    def _load_params_into_base(self, path: str):
        from lidr_jax.dist import sharding
        from lidr_jax.train.checkpoint import load_params_config, restore_params

        config = load_params_config(path)
        shardings = sharding.param_shardings(param_specs(config), self.mesh, self.rules)
        params, config = restore_params(path, shardings=shardings)
        return self._placed(self.base, params, config)

    def _load_any(self, spec: str):
        """A scorer model: a params checkpoint of this run, an HF dir, a .gguf or an embedded name."""
        from lidr_jax.formats.load import load_pretrained

        if (Path(spec) / "model_config").exists():
            return self._load_params_into_base(spec)
        m = load_pretrained(spec)
        return self._placed(m, m.params, m.config)

    def icr_scorers(self, k: int, policy):
        """(pi_DPO, pi_ref) for iteration k (METHOD.md 2.5)."""
        icr = self.cfg.icr
        if icr.scorer == "policy":
            if k == 1:
                if icr.reference_model is None:
                    raise SettingsError("icr.scorer=policy needs icr.reference_model for iteration 1 (pi_{t-1})")
                return policy, self._load_any(icr.reference_model)
            return policy, self._load_any(self.run.iteration_start_model(k - 1))
        if icr.reference_model is None:
            raise SettingsError("icr.reference_model is required: the SFT reference of the DPO model")
        if k == 1:
            dpo = self._load_any(icr.dpo_model) if icr.dpo_model else policy
            return dpo, self._load_any(icr.reference_model)
        ref = icr.reference_model if icr.reference == "original" else self.run.iteration_start_model(k - 1)
        return policy, self._load_any(ref)

    # ----------------------------------------------------------------------------------- stages
    def stage(self, k: int, name: str, fn, *args) -> dict:
        if self.run.is_done(k, name):
            return self.run.outputs(k, name)
        print(f"[iteration {k}] {name}")
        outputs = fn(self.cfg, self.run, k, *args)
        self.run.mark_done(k, name, outputs)
        return outputs

    def iteration(self, k: int) -> None:
        from lidr_jax.pipeline import icr_stages, lidr_stages, train_stages

        prompts = self.slices[k - 1]
        policy = self.policy(k)
        if self.cfg.reward == "lidr":
            self.stage(k, "generate", lidr_stages.lidr_generate, policy, prompts)
            self.stage(k, "translate", lidr_stages.lidr_translate, policy, prompts)
            self.stage(k, "pairs", lidr_stages.lidr_pairs, prompts)
        else:
            self.stage(k, "sample", icr_stages.icr_sample, policy, prompts)
            if not self.run.is_done(k, "score"):
                self.stage(k, "score", icr_stages.icr_score, self.icr_scorers(k, policy), prompts, policy)
            self.stage(k, "pairs", icr_stages.icr_pairs_stage, prompts)
        self.stage(k, "reference", train_stages.reference_stage, policy)
        self.stage(k, "train", train_stages.train_stage, policy)
        trained = self._load_params_into_base(self.run.outputs(k, "train")["policy"])
        self.stage(k, "export", train_stages.export_stage, trained)
        self.stage(k, "check", self._check, trained)

    def _check(self, cfg, run, k, model) -> dict:
        """Held-out language check (and the configured evaluation) of iteration k's trained model."""
        from lidr_jax.pipeline.check import language_check

        out = {}
        d = run.stage_dir(k, "check")
        if cfg.check.enabled and self.held_out is not None:
            out["held_out"] = language_check(cfg, run, model, self.held_out, d / "held_out.jsonl", "check")
        if cfg.evaluation.benchmarks:
            from lidr_jax.dist.multihost import generate_across_processes
            from lidr_jax.eval.evaluate import evaluate_model

            out["evaluation"] = evaluate_model(
                model, cfg.evaluation, d / "evaluation", generate_fn=generate_across_processes, write=run.write_json
            )
        return out

    def baseline(self) -> None:
        """Iteration 0: the starting model on the held-out prompts (the 'before' of before/after)."""
        if (self.cfg.check.enabled and self.held_out is not None) or self.cfg.evaluation.benchmarks:
            self.stage(0, "check", self._check, self.base)

    def run_all(self) -> None:
        from lidr_jax.dist import sharding

        t0 = time.perf_counter()
        print(f"devices: {sharding.describe_mesh(self.mesh)}")
        with sharding.use_mesh(self.mesh, self.rules):
            self.baseline()
            for k in range(1, self.cfg.iterations + 1):
                self.iteration(k)
        from lidr_jax.pipeline.report import print_summary, write_report

        report = self.run.on_writer(write_report, self.cfg, self.run)
        self.run.on_writer(print_summary, self.cfg, self.run)
        print(f"\ndone in {time.perf_counter() - t0:.0f} s" + (f"; report: {report}" if report else ""))


def build_parser() -> argparse.ArgumentParser:
    settings_help = describe(RunConfig())
    p = argparse.ArgumentParser(
        prog="python -m lidr_jax.iterate",
        description="Multilingual self-improvement (LIDR or ICR iterative DPO), end to end and resumable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings (YAML keys; override any with --set group.key=value):\n" + settings_help,
    )
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG})")
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
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    maybe_initialize_distributed()  # multi-host runs: before anything touches a device
    try:
        cfg = load_run_config(args.config, args.overrides, args.run_dir)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
            return 0
        runner = Runner(cfg, allow_config_change=args.allow_config_change)
    except (SettingsError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runner.run_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
