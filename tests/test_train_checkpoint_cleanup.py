"""After an iteration's export the training checkpoints (weights + AdamW) are deleted unless
`keep_train_checkpoints`; the disk the iteration uses is recorded and shown in the run report."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from lidr_jax.pipeline import train_stages
from lidr_jax.pipeline.config import RunConfig
from lidr_jax.pipeline.run_dir import RunDir


@pytest.mark.parametrize("keep", [False, True])
def test_export_deletes_training_checkpoints_unless_kept(tmp_path, monkeypatch, keep):
    cfg = dataclasses.replace(RunConfig(), keep_train_checkpoints=keep, run_dir=str(tmp_path / "run"))
    run = RunDir(tmp_path / "run", config={"test": 1}, seed=0)
    ckpt = run.stage_dir(1, "train") / "checkpoints" / "8"
    ckpt.mkdir(parents=True)
    (ckpt / "opt_state").write_bytes(b"x" * 3000)
    (run.stage_dir(1, "train") / "policy").mkdir()
    (run.stage_dir(1, "train") / "policy" / "params").write_bytes(b"p" * 1000)

    def fake_export(model, out, **options):  # dtype, card, ...: what export_stage passes
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"w" * 500)
        return out

    monkeypatch.setattr(train_stages, "export_hf", fake_export)
    monkeypatch.setattr(train_stages, "card_info", lambda run, k: None)
    out = train_stages.export_stage(SimpleNamespace(cfg=cfg, run=run, k=1, trained=None))
    assert (tmp_path / "run" / "iter_1" / "train" / "checkpoints").exists() == keep
    assert out["disk"] == {
        "iteration_bytes": 1500 + (3000 if keep else 0),
        "deleted_checkpoint_bytes": 0 if keep else 3000,
    }
