"""The settings of `python -m lidr_jax.iterate`: one frozen dataclass tree, read from YAML + `--set`.

Each group belongs to the module that uses it (sampling to sampling/sampler.py, dpo and metrics to train/,
prompts to methods/prompt_sets.py, the LIDR and ICR pair settings to methods/lidr.py and
methods/icr.py, evaluation to eval/evaluate.py, the mesh to parallel/sharding.py); this module only nests
them and adds the run-level knobs. `load_run_config` checks every key, type and range, and
`check_paths` every model and data path the run will read, before the run directory is created.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from lidr_jax.eval.evaluate import EvalConfig, check_data
from lidr_jax.formats.export import ExportDtype
from lidr_jax.formats.load import EMBEDDED_MODELS, ModelNotFoundError, embedded_model_path
from lidr_jax.methods.filters import PairFilterConfig
from lidr_jax.methods.icr import ICRSelectionConfig
from lidr_jax.methods.languages import language_name
from lidr_jax.methods.lidr import LIDRPairConfig, LIDRPrompts
from lidr_jax.methods.prompt_sets import PromptSourceConfig
from lidr_jax.methods.translator import TranslatorConfig
from lidr_jax.parallel.sharding import MeshConfig
from lidr_jax.sampling.sampler import SamplingConfig
from lidr_jax.settings import FieldError, SettingsError, apply_overrides, check_settings, from_dict, load_yaml, setting
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.metrics import MetricsConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.yaml"  # package data: works from any install


@dataclasses.dataclass(frozen=True)
class PromptPlanConfig:
    """Which prompts each iteration uses."""

    per_iteration: int | None = setting(None, "prompts per iteration; null = all (minus the held-out ones)", ge=1)
    fresh_per_iteration: bool = setting(True, "iteration k uses the k-th slice of per_iteration prompts")
    held_out: int = setting(0, "prompts set aside (seeded draw) for the before/after check; never trained on", ge=0)
    offset: int = setting(
        0, "training prompts skipped first: a run that continues another one takes fresh prompts", ge=0
    )

    def __post_init__(self):
        check_settings(self)


@dataclasses.dataclass(frozen=True)
class StageSampling:
    """A stage's decoding: the run's `generation`, except the fields set here (null = as in `generation`)."""

    max_new_tokens: int | None = setting(None, "new tokens per answer at most")
    temperature: float | None = setting(None, "0 = greedy")
    top_k: int | None = setting(None, "keep only the k most likely tokens; 0 = off")
    top_p: float | None = setting(None, "keep the smallest set of tokens with this much probability; 1.0 = off")
    repetition_penalty: float | None = setting(None, "transformers' semantics over prompt + output ids; 1.0 = off")
    batch_size: int | None = setting(None, "engine slots: rows decoded together")
    stop: tuple[str, ...] | None = setting(None, "stop strings; the text is cut before the first one found")

    def __post_init__(self):
        check_settings(self)  # the ranges are SamplingConfig's, checked when RunConfig resolves the stage

    def over(self, base: SamplingConfig, **derived) -> SamplingConfig:
        """`base` with the fields set here, and the run's `derived` values (seed, n)."""
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return dataclasses.replace(base, **changes, **derived)


_SEED_NOTE = "each stage's seed is derived from the run's `seed` (RunConfig.sampling)"


@dataclasses.dataclass(frozen=True)
class LIDRConfig:
    """LIDR (reward: lidr): generation in every language, self-translation both ways, pairs."""

    pairs: LIDRPairConfig = setting(
        LIDRPairConfig(),
        "how LIDR pairs are built",
        derived={"dominant": "the run's `dominant`", "seed": "the run's `seed` + the iteration"},
    )
    translation: StageSampling = setting(
        StageSampling(max_new_tokens=512, repetition_penalty=1.0),
        "the self-translations' decoding: generation's, except the fields set here (the paper: no repetition penalty)",
    )
    prompts: LIDRPrompts = setting(LIDRPrompts(), "every text LIDR sends (docs/reproducing.md)")
    translator: TranslatorConfig = setting(TranslatorConfig(), "policy (the paper) | model | endpoint")


@dataclasses.dataclass(frozen=True)
class ICRConfig:
    """ICR (reward: icr): K samples per prompt scored by a DPO model's implicit reward."""

    samples: int = setting(10, "K answers per prompt (a pair needs two)", ge=2)
    sampling: StageSampling = setting(
        StageSampling(temperature=0.9, top_p=1.0, repetition_penalty=1.0),
        "the K samples' decoding: generation's, except the fields set here (the paper: temperature 0.9, top-p 1.0)",
    )
    selection: ICRSelectionConfig = setting(ICRSelectionConfig(), "how answers are scored and paired")
    scorer: Literal["given", "policy"] = setting(
        "given",
        "who scores. given: dpo_model against reference_model at iteration 1, the current policy later; "
        "policy: the current policy against the previous iteration's",
    )
    dpo_model: str | None = setting(None, "pi_DPO of iteration 1 (scorer=given); null = the run's model")
    reference_model: str | None = setting(
        None, "pi_ref: the DPO model's SFT reference; required with reward=icr (iteration 1)"
    )
    reference: Literal["original", "previous"] = setting(
        "original", "scorer=given, iteration >= 2: keep pi_ref (the paper) or use pi_{t-1}"
    )
    translation: StageSampling = setting(
        StageSampling(max_new_tokens=512, repetition_penalty=1.0),
        "the answers' translations' decoding (condition translate_answer): generation's, except the fields set here",
    )
    score_batch_size: int = setting(8, "answers per forward when scoring", ge=1)

    def __post_init__(self):
        check_settings(self)


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    """Before/after check on held-out prompts: answer them, measure the fraction in the asked language."""

    enabled: bool = setting(True, "answer the held-out prompts (plan.held_out) before and after each iteration")
    sampling: StageSampling = setting(
        StageSampling(max_new_tokens=64), "the held-out answers' decoding: generation's, except the fields set here"
    )


_STAGES = ("generate", "translate", "sample", "translate_answers", "check")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `python -m lidr_jax.iterate` does."""

    model: str = setting("smollm2-135m-instruct", "HF directory, .gguf file, or an embedded model name")
    run_dir: str = setting("runs/default", "where every artifact goes; rerunning resumes here")
    seed: int = setting(
        0, "seeds the held-out draw, every stage's sampling, the pairs' draws and DPO's data order", ge=0
    )
    reward: Literal["lidr", "icr"] = setting(
        "lidr", "lidr: self-translation pairs | icr: implicit cross-lingual reward"
    )
    iterations: int = setting(2, "generate -> pairs -> DPO rounds, each starting from the last one's model", ge=1)
    dominant: str = setting("en", "the language the model is best in")
    languages: tuple[str, ...] = setting(("en", "es", "de", "fr", "ru"), "dominant first, then targets")
    dtype: Literal["float32", "bfloat16"] = setting("float32", "compute dtype for generation and scoring")
    prompts: PromptSourceConfig = setting(PromptSourceConfig(), "where prompts come from")
    plan: PromptPlanConfig = setting(PromptPlanConfig(), "which prompts each iteration uses")
    generation: SamplingConfig = setting(
        SamplingConfig(max_new_tokens=2400, repetition_penalty=1.1),
        "the decoding of every stage (LIDR's answers; the other stages' defaults)",
        derived={
            "seed": _SEED_NOTE,
            "n": "one answer per prompt; ICR's answers per prompt are icr.samples",
            "long_prompts": "the stages skip a prompt over the limit and count it (prompt_cut); none is cut",
        },
    )
    pair_filters: PairFilterConfig = setting(PairFilterConfig(), "quality filters of both strategies' pairs")
    lidr: LIDRConfig = setting(LIDRConfig(), "LIDR's settings (reward: lidr)")
    icr: ICRConfig = setting(ICRConfig(), "ICR's settings (reward: icr)")
    dpo: DPOConfig = setting(
        DPOConfig(), "DPO training of each iteration", derived={"seed": "the run's `seed` + the iteration"}
    )
    check: CheckConfig = setting(CheckConfig(), "the held-out language check")
    evaluation: EvalConfig = setting(
        EvalConfig(benchmarks=()), "benchmarks run on the starting model and after each iteration"
    )
    mesh: MeshConfig = setting(MeshConfig(), "device mesh and sharding rules (docs/scaling.md)")
    metrics: MetricsConfig = setting(
        MetricsConfig(), "live numbers: training every step, each stage's when it finishes"
    )
    export_dtype: ExportDtype = setting("bfloat16", "dtype of each iteration's HF export")
    checkpoint_every: int = setting(50, "training steps between Orbax checkpoints (and one at the end)", ge=1)
    checkpoint_keep: int = setting(2, "the newest training checkpoints kept", ge=1)
    keep_train_checkpoints: bool = setting(
        False,
        "keep iter_K/train/checkpoints (weights + AdamW state) after the iteration's export; false deletes "
        "them once the params-only policy and the export are written (about 96 GB each at 8B)",
    )
    compilation_cache: str | None = setting(
        "auto",
        "JAX's persistent compilation cache (lidr_jax/parallel/compile_cache.py): auto = "
        "$XDG_CACHE_HOME/lidr_jax/jax, a path, or null (off)",
    )

    def __post_init__(self):
        check_settings(self)
        for code in self.languages:
            language_name(code)  # unknown codes fail here, naming the code
        if self.dominant not in self.languages:
            raise ValueError(f"languages: the dominant language {self.dominant!r} must be in {list(self.languages)}")
        if len(self.languages) < 2:
            raise ValueError("languages: give the dominant language and at least one target language")
        if self.reward == "icr" and self.icr.reference_model is None:
            raise ValueError(
                "icr.reference_model is required with reward=icr: the SFT reference of the DPO model "
                "that scores iteration 1 (set icr.reference_model=PATH)"
            )
        for stage in _STAGES:  # each stage's decoding in SamplingConfig's ranges, named by its group
            try:
                self.sampling(stage, 1)
            except FieldError as e:
                raise FieldError(f"{_STAGE_GROUPS[stage]}.{e.field}", e.problem) from None
            except ValueError as e:
                raise ValueError(f"{_STAGE_GROUPS[stage]}: {e}") from None

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(lang for lang in self.languages if lang != self.dominant)

    def sampling(self, stage: str, k: int) -> SamplingConfig:
        """The decoding stage `stage` of iteration `k` runs with: `generation`, except the stage's group,
        with the seed derived from the run's (ICR's samples: one seed per iteration, `icr.samples` each).
        A prompt over the stage's limit is skipped and counted, never cut (`long_prompts="skip"`)."""
        if stage == "generate":
            return dataclasses.replace(self.generation, seed=self.seed, long_prompts="skip")
        if stage == "sample":
            return self.icr.sampling.over(
                self.generation, n=self.icr.samples, seed=self.seed * 1000 + k, long_prompts="skip"
            )
        group = {"translate": self.lidr.translation, "translate_answers": self.icr.translation}.get(stage)
        if group is None and stage != "check":
            raise ValueError(f"unknown stage {stage!r}; one of {list(_STAGES)}")
        return (group or self.check.sampling).over(self.generation, seed=self.seed, long_prompts="skip")

    def lidr_pairs(self, k: int) -> LIDRPairConfig:
        """LIDR's pair settings of iteration `k`: the run's dominant language, seed = the run's + k."""
        return dataclasses.replace(self.lidr.pairs, dominant=self.dominant, seed=self.seed + k)

    def dpo_for(self, k: int) -> DPOConfig:
        """DPO's settings of iteration `k`: the data order seeded by the run's seed + k."""
        return dataclasses.replace(self.dpo, seed=self.seed + k)

    def resolved(self, k: int) -> dict:
        """What iteration `k`'s stages read, as plain values: every group as set, except that the
        decoding groups are replaced by each stage's `sampling`, and `lidr.pairs` and `dpo` by their
        derived forms. A setting that changes nothing here would be ignored by the run."""
        view = dataclasses.asdict(self)
        for group in ("generation", "lidr.translation", "icr.sampling", "icr.translation", "check.sampling"):
            *parents, name = group.split(".")
            node = view
            for parent in parents:
                node = node[parent]
            del node[name]
        view["stages"] = {stage: dataclasses.asdict(self.sampling(stage, k)) for stage in _STAGES}
        view["lidr"]["pairs"] = dataclasses.asdict(self.lidr_pairs(k))
        view["dpo"] = dataclasses.asdict(self.dpo_for(k))
        return view


_STAGE_GROUPS = {
    "generate": "generation",
    "translate": "lidr.translation",
    "sample": "icr.sampling",
    "translate_answers": "icr.translation",
    "check": "check.sampling",
}


def load_run_config(path: str | Path | None = None, overrides: list[str] = (), run_dir: str | None = None) -> RunConfig:
    """YAML file (default: the packaged default.yaml) + `--set` overrides -> RunConfig."""
    data = load_yaml(path or DEFAULT_CONFIG)
    data = apply_overrides(data, list(overrides))
    if run_dir is not None:
        data["run_dir"] = run_dir
    # The prompt source's languages follow the run's languages unless set explicitly.
    prompts = data.setdefault("prompts", {})
    if isinstance(prompts, dict):
        prompts.setdefault("languages", data.get("languages", list(RunConfig.languages)))
    try:
        return from_dict(RunConfig, data)
    except SettingsError:
        raise
    except (ValueError, KeyError) as e:
        raise SettingsError(str(e)) from e


def check_model(spec: str, setting: str) -> None:
    """Fail before any work if `spec` names no model lidr_jax can load: an embedded name whose package
    is installed, a directory, or a .gguf file (what is inside is checked when it loads)."""
    if spec in EMBEDDED_MODELS:
        embedded_model_path(spec)
        return
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return
    raise ModelNotFoundError(
        f"{setting}: model {spec!r} not found: it is not a model directory, a .gguf file or an embedded model "
        f"name ({', '.join(EMBEDDED_MODELS)}); fix the path (lidr_jax never downloads models)"
    )


def check_paths(cfg: RunConfig) -> None:
    """Every model and data path the run will read exists, checked before the run directory is created:
    the model, ICR's scorer models, and the data (folders and each language's files) of the evaluation
    benchmarks asked for."""
    check_model(cfg.model, "model")
    if cfg.reward == "icr":
        for setting in ("dpo_model", "reference_model"):
            spec = getattr(cfg.icr, setting)
            if spec is not None:
                check_model(spec, f"icr.{setting}")
    ev = cfg.evaluation
    folders = {"mgsm": ("mgsm_dir", ev.mgsm_dir), "alpaca": ("alpaca_dir", ev.alpaca_dir)}
    for benchmark in ev.benchmarks:
        setting, folder = folders.get(benchmark, (None, None))
        if setting is not None and (folder is None or not Path(folder).is_dir()):
            raise SettingsError(
                f"evaluation.{setting}: {folder!r} is not a folder; evaluation.benchmarks lists {benchmark}, "
                f"so set evaluation.{setting} to its data folder (or drop {benchmark} from the benchmarks)"
            )
    try:
        check_data(ev)  # each language's file in those folders, before a model loads
    except (ValueError, FileNotFoundError) as e:
        raise SettingsError(f"evaluation: {e}") from None
