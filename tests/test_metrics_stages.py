"""Each pipeline stage's numbers reach the one metrics sink when the stage finishes, and training's
every step while it runs: TensorBoard (and W&B when installed and asked for) configured by the run
config's `metrics:` group."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
from test_checkpoint import _train_config, _write_pairs

from lidr_jax.files import plain
from lidr_jax.pipeline.config import RunConfig, load_run_config
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.pipeline.runner import build_parser
from lidr_jax.settings import SettingsError
from lidr_jax.train.checkpoint import TrainCheckpointer
from lidr_jax.train.metrics import MetricsConfig, MetricsSink, read_tensorboard_scalars

# What the LIDR stages return (shapes as lidr_jax.pipeline.lidr_stages and check.py build them).
TRANSLATE = {"translations": "x", "stats": {"translator": "policy", "failed": {"en->es": 2, "es->en": 0}}}
PAIRS = {"stats": {"table": {"es": {"kept": 3, "dropped": {"identical": 1, "wrong_language": 2}}}, "pairs": 3}}
CHECK = {"held_out": {"in_language": {"es": 0.25, "en": 1.0}, "in_language_low": {"es": 0.0}}}


def test_each_stage_writes_its_numbers_when_marked_done(tmp_path):
    run = RunDir(tmp_path / "run", config={"a": 1}, metrics=MetricsConfig())
    run.mark_done(0, "check", {**CHECK, "path": str(tmp_path / "run" / "iter_0")})
    run.mark_done(1, "translate", TRANSLATE)
    # read while the run goes on: the sink flushes each stage's numbers as it logs them
    assert read_tensorboard_scalars(tmp_path / "run" / "tensorboard" / "stages") == {
        "check/held_out/in_language/es": [(0, 0.25)],
        "check/held_out/in_language/en": [(0, 1.0)],
        "check/held_out/in_language_low/es": [(0, 0.0)],
        "translate/stats/failed/en->es": [(1, 2.0)],
        "translate/stats/failed/es->en": [(1, 0.0)],
    }
    run.mark_done(1, "pairs", PAIRS)
    run.close()
    tags = read_tensorboard_scalars(tmp_path / "run" / "tensorboard" / "stages")
    assert tags["pairs/stats/table/es/kept"] == [(1, 3.0)]
    assert tags["pairs/stats/table/es/dropped/identical"] == [(1, 1.0)]
    assert tags["pairs/stats/table/es/dropped/wrong_language"] == [(1, 2.0)]
    assert tags["pairs/stats/pairs"] == [(1, 3.0)]


def test_no_metrics_config_or_not_the_writer_writes_nothing(tmp_path):
    RunDir(tmp_path / "a", config={"a": 1}).mark_done(1, "pairs", PAIRS)
    off = RunDir(tmp_path / "b", config={"a": 1}, metrics=MetricsConfig(report_to=()))
    off.mark_done(1, "pairs", PAIRS)
    off.close()
    assert not (tmp_path / "a" / "tensorboard").exists() and not (tmp_path / "b" / "tensorboard").exists()


def test_wandb_asked_for_without_the_package_says_so_once_and_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    run = RunDir(tmp_path / "run", config={"a": 1}, metrics=MetricsConfig(report_to=("tensorboard", "wandb")))
    run.mark_done(1, "translate", TRANSLATE)
    run.mark_done(1, "pairs", PAIRS)
    run.close()
    assert capsys.readouterr().out == (
        "metrics: report_to lists wandb but the wandb package is not installed; skipping W&B\n"
    )
    assert read_tensorboard_scalars(tmp_path / "run" / "tensorboard" / "stages")["pairs/stats/pairs"] == [(1, 3.0)]
    assert run.is_done(1, "pairs")


def test_sinks_share_one_wandb_run_each_with_its_own_axis(tmp_path, monkeypatch):
    """The run's stage sink starts the W&B run; a training sink opened meanwhile logs into it against its
    own step axis (W&B's own step must only grow) and leaves finishing it to the sink that started it."""
    if "wandb" in sys.modules and sys.modules["wandb"] is not None:
        pytest.skip("the real wandb is imported in this process; this test uses a stand-in module")
    calls = []

    class Run:
        def log(self, values, step=None):
            calls.append(("log", values, step))

        def define_metric(self, name, step_metric):
            calls.append(("define_metric", name, step_metric))

        def finish(self):
            calls.append(("finish",))
            fake.run = None

    def init(**kwargs):
        calls.append(("init", kwargs["mode"], kwargs["project"]))
        fake.run = Run()
        return fake.run

    fake = types.SimpleNamespace(run=None, init=init, Settings=dict)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = MetricsConfig(report_to=("wandb",), wandb_project="p")
    run = RunDir(tmp_path / "run", config={"a": 1}, metrics=cfg)
    run.mark_done(1, "pairs", PAIRS)
    with MetricsSink(cfg, jsonl_path=tmp_path / "m.jsonl", wandb_prefix="iter_1/train") as train:
        train.log({"loss": 0.5}, step=1)
        train.log({"loss": 0.25}, step=2)
    run.mark_done(1, "train", {"stats": {"last": {"loss": 0.25}}})
    run.close()
    assert calls == [
        ("init", "offline", "p"),
        ("define_metric", "stages/*", "stages/step"),
        ("log", {"stages/pairs/stats/table/es/kept": 3.0, **_rest_of_pairs(), "stages/step": 1}, None),
        ("define_metric", "iter_1/train/*", "iter_1/train/step"),
        ("log", {"iter_1/train/loss": 0.5, "iter_1/train/step": 1}, None),
        ("log", {"iter_1/train/loss": 0.25, "iter_1/train/step": 2}, None),
        ("log", {"stages/train/stats/last/loss": 0.25, "stages/step": 1}, None),
        ("finish",),
    ]


def _rest_of_pairs() -> dict:
    return {
        "stages/pairs/stats/table/es/dropped/identical": 1.0,
        "stages/pairs/stats/table/es/dropped/wrong_language": 2.0,
        "stages/pairs/stats/pairs": 3.0,
    }


def test_metrics_group_in_the_run_config(tmp_path):
    assert RunConfig().metrics == MetricsConfig(report_to=("tensorboard",))
    cfg = load_run_config(overrides=["metrics.report_to=[tensorboard,wandb]", "metrics.wandb_mode=online"])
    assert cfg.metrics == MetricsConfig(report_to=("tensorboard", "wandb"), wandb_mode="online")
    assert load_run_config(overrides=["metrics.report_to=[]"]).metrics.report_to == ()
    with pytest.raises(
        SettingsError, match=r"metrics.report_to\[0\] must be one of \['tensorboard', 'wandb'\], got 'mlflow'"
    ):
        load_run_config(overrides=["metrics.report_to=[mlflow]"])
    epilog = build_parser().epilog
    for line in ("metrics.report_to = ('tensorboard',)", "metrics.wandb_project = 'lidr_jax'", "metrics.wandb_mode"):
        assert line in epilog, line


def test_train_stage_writes_every_step_while_it_trains(make_hf_model, tmp_path, monkeypatch):
    """The real train stage, checkpointing every step: right after each step's checkpoint the step is
    already in TensorBoard (no end-of-training conversion); once marked done, its summary is a stage number."""
    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.parallel.sharding import make_mesh, parse_rules
    from lidr_jax.pipeline import train_stages
    from lidr_jax.pipeline.iteration import Iteration
    from lidr_jax.pipeline.models import RunModels

    seen = {}
    logdir = tmp_path / "run" / "tensorboard" / "iter_1"

    class Watching(TrainCheckpointer):
        def save(self, step, *args, **kwargs):
            saved = super().save(step, *args, **kwargs)
            if saved:
                seen[int(step)] = [s for s, _ in read_tensorboard_scalars(logdir).get("loss", [])]
            return saved

    monkeypatch.setattr(train_stages, "TrainCheckpointer", Watching)
    model_dir = make_hf_model("llama", seed=7)
    cfg = dataclasses.replace(_train_config(str(tmp_path / "run"), str(model_dir)), checkpoint_every=1)
    run = RunDir(cfg.run_dir, config=plain(cfg), seed=cfg.seed, metrics=cfg.metrics)
    _write_pairs(run)
    models = RunModels(str(model_dir), cfg.dtype, make_mesh(cfg.mesh), parse_rules(), base=load_pretrained(model_dir))
    it = Iteration(cfg, run, 1, models)
    run.mark_done(1, "reference", train_stages.reference_stage(it))
    run.mark_done(1, "train", train_stages.train_stage(it))
    run.close()
    steps = sorted(seen)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
    assert all(seen[s] == list(range(1, s + 1)) for s in steps)  # every step on disk when its checkpoint is
    stages = read_tensorboard_scalars(tmp_path / "run" / "tensorboard" / "stages")
    assert [s for s, _ in stages["train/stats/last/loss"]] == [1]
    assert stages["reference/stats/pairs"] == [(1, 12.0)]
