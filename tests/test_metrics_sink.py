"""The training metrics sink: JSONL and TensorBoard every step, W&B only when asked for and installed
(offline by default), nested stage numbers as flat tags, resumed metrics files cut at the checkpoint."""

from __future__ import annotations

import json
import sys
import types

import pytest

from lidr_jax.train.metrics import MetricsConfig, MetricsSink, read_tensorboard_scalars, scalars, truncate_metrics


def test_jsonl_and_tensorboard_every_step(tmp_path):
    sink = MetricsSink(MetricsConfig(), jsonl_path=tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    assert sink.destinations == ["jsonl", "tensorboard"]
    sink.log({"loss": 0.7, "rewards/accuracies": 0.5, "note": "x"}, step=1)
    # readable before close: nothing waits for the end of training
    assert read_tensorboard_scalars(tmp_path / "tb") == {
        "loss": [(1, pytest.approx(0.7))],
        "rewards/accuracies": [(1, 0.5)],
    }
    sink.log({"loss": float("nan"), "grad_norm": 2.0}, step=2)
    sink.close()
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows[0] == {"loss": 0.7, "rewards/accuracies": 0.5, "note": "x", "step": 1}
    assert rows[1]["step"] == 2 and rows[1]["grad_norm"] == 2.0
    tb = read_tensorboard_scalars(tmp_path / "tb")
    assert tb["grad_norm"] == [(2, 2.0)] and [s for s, _ in tb["loss"]] == [1]  # NaN is kept out of TensorBoard


def test_stage_numbers_as_flat_tags(tmp_path):
    numbers = {"pairs_per_language": {"es": 3, "de": 5}, "failed": {"en->es": 1}, "ok": True, "path": "/x"}
    assert scalars(numbers, "iter_1/pairs") == {
        "iter_1/pairs/pairs_per_language/es": 3.0,
        "iter_1/pairs/pairs_per_language/de": 5.0,
        "iter_1/pairs/failed/en->es": 1.0,
    }
    with MetricsSink(MetricsConfig(), tensorboard_dir=tmp_path / "tb") as sink:
        sink.log(numbers, step=1, prefix="pairs")
    assert read_tensorboard_scalars(tmp_path / "tb")["pairs/pairs_per_language/de"] == [(1, 5.0)]


def test_wandb_only_when_asked_and_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with MetricsSink(MetricsConfig(report_to=["wandb"]), jsonl_path=tmp_path / "a.jsonl") as sink:
        sink.log({"loss": 1.0}, step=1)
        assert sink.destinations == ["jsonl"]
    assert "report_to lists wandb but the wandb package is not installed" in capsys.readouterr().out

    calls = []

    class Run:
        def log(self, tags, step):
            calls.append(("log", tags, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run(), Settings=dict)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsSink(MetricsConfig(), jsonl_path=tmp_path / "b.jsonl") as sink:  # installed, not asked for
        sink.log({"loss": 1.0}, step=1)
    assert calls == []
    cfg = MetricsConfig(report_to=["tensorboard", "wandb"])
    with MetricsSink(cfg, tensorboard_dir=tmp_path / "tb", run_name="r1", run_config={"beta": 0.1}) as sink:
        sink.log({"loss": 0.5, "rewards": {"margins": 0.25}}, step=3)
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["name"] == "r1"
    assert calls[0][1]["config"] == {"beta": 0.1} and calls[0][1]["project"] == "lidr_jax"
    assert calls[1] == ("log", {"loss": 0.5, "rewards/margins": 0.25}, 3)
    assert calls[2] == ("finish",)


def test_config_checks():
    assert MetricsConfig(report_to="wandb").report_to == ("wandb",)
    with pytest.raises(ValueError, match=r"report_to\[0\] must be one of \['tensorboard', 'wandb'\], got 'mlflow'"):
        MetricsConfig(report_to=["mlflow"])
    with pytest.raises(ValueError, match=r"wandb_mode must be one of \['offline', 'online'\], got 'cloud'"):
        MetricsConfig(wandb_mode="cloud")


def test_truncate_metrics_after_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')  # killed while writing step 4
    assert truncate_metrics(path, 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON, and not a last line cut by a kill"):
        truncate_metrics(path, 5)
    assert truncate_metrics(tmp_path / "absent.jsonl", 3) == 0
