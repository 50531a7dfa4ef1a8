"""The fit check at config load: `python -m lidr_jax.iterate` with a DPO state its mesh cannot hold stops
in `open_run` before any model loads, any pair is generated or the run directory exists, with one line
naming the numbers (lidr_jax.train.memory.check_model_fits)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lidr_jax.model.scoring import ScoringConfig
from lidr_jax.pipeline import models, runner
from lidr_jax.train.dpo import DPOConfig
from lidr_jax.train.memory import check_model_fits, plan_memory, size
from tests.dpo_helpers import tiny_config, write_tiny_hf_dir


class _Chip:
    platform, device_kind = "tpu", "TPU v5 lite"
    process_index = 0

    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return {"bytes_limit": self.limit}


class _Mesh:  # what the fit check reads of a jax Mesh: its devices and axis sizes
    def __init__(self, limit, fsdp):
        self.devices = np.array([_Chip(limit)] * fsdp)
        self.shape = {"data": 1, "fsdp": fsdp, "tensor": 1}


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    def guard(*args, **kwargs):
        raise AssertionError("a model was loaded before the fit check")

    monkeypatch.setattr(models, "load_pretrained", guard)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for lang in ("en", "es"):
        (prompts / f"{lang}.jsonl").write_text(
            "".join(json.dumps({"id": f"q{i}", "instruction": f"{lang} {i}"}) + "\n" for i in range(2))
        )
    return prompts, write_tiny_hf_dir(tmp_path / "model"), tmp_path / "run"


def test_a_config_the_mesh_cannot_hold_stops_before_any_model_work(setup, monkeypatch, capsys):
    prompts, model, run = setup
    dpo = DPOConfig(row_tokens=128, batch_size=4, compute=ScoringConfig(attention="xla"))
    needed = plan_memory(tiny_config(), dpo, (1, 2, 1)).total
    monkeypatch.setattr(runner.sharding, "make_mesh", lambda cfg: _Mesh(needed - 1, 2))
    argv = ["--run-dir", str(run)]
    for s in (f"model={model}", "languages=[en,es]", f"prompts.path={prompts}", "iterations=1"):
        argv += ["--set", s]
    argv += ["--set", "plan.per_iteration=1", "--set", "plan.held_out=1"]
    argv += ["--set", "dpo.row_tokens=128", "--set", "dpo.batch_size=4", "--set", "dpo.compute.attention=xla"]
    assert runner.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not run.exists()
    plan = plan_memory(tiny_config(), dpo, (1, 2, 1))
    assert err == (
        f"error: DPO training needs {plan.describe()}, but each TPU v5 lite has "
        f"{size(needed - 1)}: use more devices (a larger fsdp axis), remat, a smaller batch_size or "
        "row_tokens, or bfloat16 compute\n"
    )


def test_fit_check_at_load_reads_only_config_json(tmp_path):
    model = write_tiny_hf_dir(tmp_path / "model")
    cfg = DPOConfig(row_tokens=128, batch_size=4, compute=ScoringConfig(attention="xla"))
    needed = plan_memory(tiny_config(), cfg, (1, 2, 1)).total
    assert check_model_fits(str(model), cfg, _Mesh(needed, 2)).total == needed
    assert check_model_fits(str(tmp_path / "model.gguf"), cfg, _Mesh(1, 2)) is None  # checked once loaded
