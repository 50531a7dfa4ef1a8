"""The real W&B client (a test extra), offline: the run's stage sink and a training sink write into one
W&B run, each against its own step axis, and the run's files stay beside the run directory. Run in a
subprocess so the real `wandb` module never meets test_metrics_stages' stand-in."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT

from lidr_jax.pipeline import runner
from lidr_jax.train import cli

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import wandb
    from lidr_jax.pipeline.run_dir import RunDir
    from lidr_jax.train.metrics import MetricsConfig, MetricsSink

    cfg = MetricsConfig(report_to=("wandb",), wandb_project="lidr-test", wandb_mode="offline")
    run = RunDir(sys.argv[1], config={"lr": 5e-6}, metrics=cfg)
    run.mark_done(1, "pairs", {"stats": {"table": {"es": {"kept": 3}}}})
    with MetricsSink(cfg, jsonl_path=run.path / "m.jsonl", wandb_prefix="iter_1/train") as train:
        for step in (1, 2, 3):
            train.log({"loss": 1.0 / step}, step=step)
    run.mark_done(2, "pairs", {"stats": {"table": {"es": {"kept": 5}}}})
    live = wandb.run
    out = dict(summary={k: v for k, v in dict(live.summary).items() if not k.startswith("_")},
               config=dict(live.config), project=live.project, offline=live.offline)
    run.close()
    out["finished"] = wandb.run is None
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("verbose", [False, True])
def test_real_wandb_offline_one_run_two_axes(tmp_path, verbose):
    env = dict(
        {k: v for k, v in os.environ.items() if k != "LIDR_JAX_VERBOSE"},
        PYTHONPATH=str(REPO_ROOT),
        JAX_PLATFORMS="cpu",
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
    )
    if verbose:
        env["LIDR_JAX_VERBOSE"] = "1"  # what --verbose sets (test_verbose_flag_shows_wandb_lines)
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # W&B's own lines (its offline-sync hint) only with --verbose
    assert ("wandb:" in res.stderr) is verbose, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["summary"] == {
        "stages/pairs/stats/table/es/kept": 5,  # iteration 2's stage, logged after training's 3 steps: kept
        "stages/step": 2,
        "iter_1/train/loss": 1 / 3,
        "iter_1/train/step": 3,
    }
    assert out["config"] == {"lr": 5e-6} and out["project"] == "lidr-test" and out["offline"] is True
    assert out["finished"]  # the stage sink started the W&B run and finished it
    (offline_run,) = (tmp_path / "run" / "tensorboard" / "wandb").glob("offline-run-*")  # beside our own files
    assert list(offline_run.glob("run-*.wandb"))


@pytest.mark.parametrize(
    "main, args",
    [
        (runner.main, ["--set", "no_such_setting=1"]),
        (cli.main, ["--model", "m", "--pairs", "none.jsonl", "--out", "o"]),
    ],
    ids=["iterate", "dpo"],
)
def test_verbose_flag_shows_wandb_lines(main, args, monkeypatch, capsys, tmp_path):
    """Both commands' --verbose sets LIDR_JAX_VERBOSE (read by lidr_jax.train.metrics) before any work;
    here the command then stops at its first refusal."""
    monkeypatch.delenv("LIDR_JAX_VERBOSE", raising=False)
    monkeypatch.chdir(tmp_path)
    with contextlib.suppress(SystemExit):
        assert main(["--verbose", *args]) != 0
    assert "error" in capsys.readouterr().err
    assert os.environ.get("LIDR_JAX_VERBOSE") == "1"
