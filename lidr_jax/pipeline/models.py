"""The models of one run: the base model, this run's checkpoints in the base's structure, and any other
model a stage names (ICR's scorers).

Every model is placed on the run's mesh (each device receives only its own shards) and computes in the
run's dtype. The base model is loaded once, on first use, so a run whose stages are all done loads
nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jax.sharding import Mesh

from lidr_jax.files import as_path
from lidr_jax.formats.load import Model, load_pretrained
from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import param_specs
from lidr_jax.parallel import sharding
from lidr_jax.train.checkpoint import load_params_config, restore_params


class RunModels:
    """Loads models for a run whose base model is `model` (a path or an embedded name), placed on `mesh`
    under `rules`, computing in `dtype`. `base` may be given already loaded (tests)."""

    def __init__(self, model: str, dtype: str, mesh: Mesh, rules: sharding.Rules, base: Model | None = None):
        self.model, self.dtype, self.mesh, self.rules = model, dtype, mesh, rules
        self._base = base

    @property
    def base(self) -> Model:
        """The run's starting model (loaded on first use)."""
        if self._base is None:
            print(f"loading {self.model}")
            m = load_pretrained(self.model)
            self._base = self.placed(m, m.params, m.config)
        return self._base

    def release_base(self) -> None:
        """Forget the loaded base model (it is loaded again on next use)."""
        self._base = None

    def placed(self, model: Model, params, config: ModelConfig) -> Model:
        """`model` with `params` placed per the mesh and `config` computing in the run's dtype."""
        params = sharding.place_params(params, param_specs(config), self.mesh, self.rules)
        return dataclasses.replace(model, params=params, config=config.replace(dtype=self.dtype))

    def from_checkpoint(self, path: str | Path) -> Model:
        """A params checkpoint of this run (lidr_jax.train.checkpoint) with the base model's tokenizer,
        restored straight onto the mesh."""
        config = load_params_config(path)
        shardings = sharding.param_shardings(param_specs(config), self.mesh, self.rules)
        params, config = restore_params(path, shardings=shardings)
        return self.placed(self.base, params, config)

    def load(self, spec: str) -> Model:
        """Any model: a params checkpoint of this run, an HF directory, a .gguf file or an embedded name."""
        if (as_path(spec) / "model_config").exists():
            return self.from_checkpoint(spec)
        m = load_pretrained(spec)
        return self.placed(m, m.params, m.config)
