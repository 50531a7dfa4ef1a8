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
from lidr_jax.formats.load import EMBEDDED_MODELS, ModelNotFoundError, embedded_model_path
from lidr_jax.methods.filters import PairFilterConfig
from lidr_jax.methods.icr import ICRSelectionConfig
from lidr_jax.methods.languages import language_name
from lidr_jax.methods.lidr import LIDRPairConfig, LIDRPrompts
from lidr_jax.methods.prompt_sets import PromptSourceConfig
from lidr_jax.methods.translator import TranslatorConfig
from lidr_jax.parallel.sharding import MeshConfig
from lidr_jax.sampling.sampler import SamplingConfig
from lidr_jax.settings import SettingsError, apply_overrides, check_choices, from_dict, load_yaml
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.metrics import MetricsConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.yaml"  # package data: works from any install


@dataclasses.dataclass(frozen=True)
class PromptPlanConfig:
    """Which prompts each iteration uses."""

    per_iteration: int | None = None  # prompts per iteration; None = all (minus the held-out ones)
    fresh_per_iteration: bool = True  # iteration k uses the k-th slice of per_iteration prompts
    held_out: int = 0  # prompts set aside (seeded draw) for the before/after check; never trained on
    offset: int = 0  # training prompts skipped first: a run that continues another one takes fresh prompts


@dataclasses.dataclass(frozen=True)
class LIDRConfig:
    """LIDR (reward: lidr): generation in every language, self-translation both ways, pairs."""

    pairs: LIDRPairConfig = LIDRPairConfig()
    translation: SamplingConfig = SamplingConfig(max_new_tokens=512, repetition_penalty=1.0)
    prompts: LIDRPrompts = LIDRPrompts()  # every text LIDR sends (docs/reproducing.md)
    translator: TranslatorConfig = TranslatorConfig()  # policy (the paper) | model | endpoint


@dataclasses.dataclass(frozen=True)
class ICRConfig:
    """ICR (reward: icr): K samples per prompt scored by a DPO model's implicit reward."""

    samples: int = 10  # K answers per prompt
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=2400, temperature=0.9, top_p=1.0)
    selection: ICRSelectionConfig = ICRSelectionConfig()
    # Who scores. given: dpo_model and reference_model score iteration 1, the current policy later ones;
    # policy: pi_DPO = the current policy, pi_ref = the previous iteration's policy.
    scorer: Literal["given", "policy"] = "given"  # given: dpo_model vs reference_model | policy: pi_t vs pi_{t-1}
    dpo_model: str | None = None  # pi_DPO for iteration 1; None = the run's model
    reference_model: str | None = None  # pi_ref (the DPO model's SFT reference); required for iteration 1
    reference: Literal["original", "previous"] = "original"  # iteration >= 2: keep pi_ref (paper) or use pi_{t-1}
    translation: SamplingConfig = SamplingConfig(max_new_tokens=512)  # condition=translate_answer only
    score_batch_size: int = 8  # answers per forward when scoring

    def __post_init__(self):
        check_choices(self)
        if self.samples < 2 or self.score_batch_size < 1:
            raise ValueError(
                f"icr.samples must be >= 2 (a pair needs two answers), got {self.samples}, and "
                f"icr.score_batch_size >= 1, got {self.score_batch_size}"
            )


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    """Before/after check on held-out prompts: answer them, measure the fraction in the asked language."""

    enabled: bool = True
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, repetition_penalty=1.1)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `python -m lidr_jax.iterate` does."""

    model: str = "smollm2-135m-instruct"  # HF directory, .gguf file, or an embedded model name
    run_dir: str = "runs/default"  # where every artifact goes; rerunning resumes here
    seed: int = 0
    reward: Literal["lidr", "icr"] = "lidr"
    iterations: int = 2
    dominant: str = "en"  # the language the model is best in
    languages: tuple[str, ...] = ("en", "es", "de", "fr", "ru")  # dominant first, then targets
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype for generation and scoring
    prompts: PromptSourceConfig = PromptSourceConfig()
    plan: PromptPlanConfig = PromptPlanConfig()
    generation: SamplingConfig = SamplingConfig(max_new_tokens=2400, repetition_penalty=1.1)
    pair_filters: PairFilterConfig = PairFilterConfig()  # quality filters of both strategies' pairs
    lidr: LIDRConfig = LIDRConfig()
    icr: ICRConfig = ICRConfig()
    dpo: DPOConfig = DPOConfig()
    check: CheckConfig = CheckConfig()
    evaluation: EvalConfig = EvalConfig(benchmarks=())  # benchmarks run on the starting model and after each iteration
    mesh: MeshConfig = MeshConfig()  # device mesh and sharding rules (lidr_jax.parallel.sharding, docs/scaling.md)
    metrics: MetricsConfig = MetricsConfig()  # live numbers: training every step, each stage's when it finishes
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # dtype of each iteration's HF export
    checkpoint_every: int = 50  # training steps between Orbax checkpoints (and at the end)
    checkpoint_keep: int = 2
    # keep iter_K/train/checkpoints (weights + AdamW state) after the iteration's export; false deletes them
    # once the params-only policy and the export are written (about 96 GB each at 8B)
    keep_train_checkpoints: bool = False
    # JAX's persistent compilation cache (lidr_jax/parallel/compile_cache.py): auto = $XDG_CACHE_HOME/lidr_jax/jax
    # (~/.cache/lidr_jax/jax), a path, or null (off). Later stages and reruns read compiled programs back.
    compilation_cache: str | None = "auto"

    def __post_init__(self):
        check_choices(self)
        for code in self.languages:
            language_name(code)  # unknown codes fail here, naming the code
        if self.dominant not in self.languages:
            raise ValueError(f"languages: the dominant language {self.dominant!r} must be in {list(self.languages)}")
        if len(self.languages) < 2:
            raise ValueError("languages: give the dominant language and at least one target language")
        if self.iterations < 1:
            raise ValueError("iterations must be >= 1")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds NumPy and JAX), got {self.seed}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 training step, got {self.checkpoint_every}")
        if self.checkpoint_keep < 1:
            raise ValueError(f"checkpoint_keep must be >= 1 checkpoint, got {self.checkpoint_keep}")
        if self.reward == "icr" and self.icr.reference_model is None:
            raise ValueError(
                "icr.reference_model is required with reward=icr: the SFT reference of the DPO model "
                "that scores iteration 1 (set icr.reference_model=PATH)"
            )

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(lang for lang in self.languages if lang != self.dominant)


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
