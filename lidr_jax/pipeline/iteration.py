"""What a stage gets: one iteration's config, run directory, prompts and models.

A stage is a function `stage(it: Iteration) -> dict` that reads its inputs (the outputs of earlier
stages, through `it.run.outputs`) and returns its own outputs, which the runner records in the
manifest. A strategy's chain is a list of `(name, stage)` pairs (lidr_jax.pipeline.runner).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from lidr_jax.formats.load import Model
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.pipeline.config import RunConfig
from lidr_jax.pipeline.models import RunModels
from lidr_jax.pipeline.run_dir import RunDir


@dataclasses.dataclass
class Iteration:
    """Iteration `k` of a run (k = 0: the starting model, before any training). Models load on first
    use, so a stage that needs none loads none."""

    cfg: RunConfig
    run: RunDir
    k: int
    models: RunModels
    prompts: PromptSet | None = None  # this iteration's training prompts (None for k = 0)
    held_out: PromptSet | None = None  # the held-out prompts of the language check (None: no check)

    @functools.cached_property
    def policy(self) -> Model:
        """The model the iteration starts from: the base model, or iteration k-1's trained policy."""
        if self.k <= 1:
            return self.models.base
        return self.models.from_checkpoint(self.run.outputs(self.k - 1, "train")["policy"])

    def release_policy(self) -> None:
        """Drop the policy (and the base model it may be) so a stage can hold another model alone (LIDR's
        model translator); the next use of `policy` loads it again."""
        self.__dict__.pop("policy", None)
        self.models.release_base()

    @functools.cached_property
    def trained(self) -> Model:
        """The model the iteration ends with: its trained policy (k = 0: the base model)."""
        if self.k == 0:
            return self.models.base
        return self.models.from_checkpoint(self.run.outputs(self.k, "train")["policy"])


def start_model(cfg: RunConfig, run: RunDir, k: int) -> str:
    """What iteration `k` starts from, as the manifest records it: the run's model, or a policy path."""
    return cfg.model if k == 1 else run.outputs(k - 1, "train")["policy"]


Stage = Callable[[Iteration], dict]
