"""`python -m lidr_jax.dpo` as the pipeline's trainer: a YAML config with --set, a 2-device fsdp mesh,
TensorBoard scalars written while it trains, an Orbax checkpoint per step, and a SIGKILL after step 2
followed by a rerun that ends with exactly the parameters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dpo_helpers import PAIRS, write_tiny_hf_dir

from lidr_jax.train.metrics import read_tensorboard_scalars

REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
dpo:
  batch_size: 2
  learning_rate: 1e-3
  warmup: 0
  compute:
    logprob_chunk: 16
  max_response_len: 32
mesh:
  preset: fsdp
metrics:
  report_to: [tensorboard]
checkpoint_every: 1
"""


def _dpo(model_dir, pairs, out, config, *extra, crash_at=None):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    env.pop("LIDR_JAX_CRASH_AT", None)
    if crash_at:
        env["LIDR_JAX_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "lidr_jax.dpo", "--model", str(model_dir), "--pairs", str(pairs), "--out", str(out)]
    cmd += ["--config", str(config), "--export-dtype", "float32", "--quiet", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_resume")
    model_dir = write_tiny_hf_dir(d / "model")
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    config = d / "run.yaml"
    config.write_text(CONFIG)
    killed = _dpo(model_dir, pairs, d / "resumed", config, crash_at="dpo:2")
    tb_at_kill = read_tensorboard_scalars(d / "resumed" / "tensorboard")
    resumed = _dpo(model_dir, pairs, d / "resumed", config)
    straight = _dpo(model_dir, pairs, d / "straight", config)
    return dict(
        d=d,
        killed=killed,
        tb_at_kill=tb_at_kill,
        resumed=resumed,
        straight=straight,
        model_dir=model_dir,
        pairs=pairs,
        config=config,
    )


def test_kill_then_rerun_reaches_the_uninterrupted_parameters(runs):
    assert runs["killed"].returncode == -signal.SIGKILL, runs["killed"].stderr[-2000:]
    assert runs["straight"].returncode == 0, runs["straight"].stderr[-2000:]
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-2000:]
    assert "resuming from the checkpoint at step 2 of 4" in runs["resumed"].stderr
    assert "fsdp=2" in runs["straight"].stderr or "2 devices" in runs["straight"].stderr, runs["straight"].stderr[-800:]
    a, b = _weights(runs["d"] / "straight" / "model"), _weights(runs["d"] / "resumed" / "model")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    start = _weights(runs["model_dir"])
    assert max(float(np.abs(a[k] - start[k]).max()) for k in a) > 1e-4  # it did train


def test_metrics_once_per_step_and_tensorboard_live(runs):
    rows = [json.loads(x) for x in (runs["d"] / "resumed" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(x) for x in (runs["d"] / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]
    assert rows[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-5)
    # the killed run had written steps 1 and 2 to TensorBoard before it died: written while training
    assert [s for s, _ in runs["tb_at_kill"]["loss"]] == [1, 2]
    tb = read_tensorboard_scalars(runs["d"] / "straight" / "tensorboard")
    assert [s for s, _ in tb["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in tb["rewards/accuracies"]] == pytest.approx([r["rewards/accuracies"] for r in straight])
    saved = json.loads((runs["d"] / "straight" / "dpo_config.json").read_text())
    assert saved["dpo"]["learning_rate"] == 1e-3 and saved["run"]["checkpoint_every"] == 1
    assert saved["run"]["mesh"]["preset"] == "fsdp"


def test_rerun_with_other_settings_is_refused(runs):
    out = _dpo(runs["model_dir"], runs["pairs"], runs["d"] / "straight", runs["config"], "--set", "beta=0.3")
    assert out.returncode == 2
    assert "holds checkpoints of a run with other dpo" in out.stderr
