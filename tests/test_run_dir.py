"""Run directory layout, manifest, atomic writes and the resume-with-a-different-config check."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from lidr_jax.files import atomic_write_json, atomic_write_jsonl, atomic_write_text
from lidr_jax.pipeline import run_dir as rd
from lidr_jax.pipeline.run_dir import (
    RunConfigMismatchError,
    RunDir,
    StageNotDoneError,
)

CONFIG = {"model": "smollm2-135m-instruct", "dpo": {"beta": 0.1, "lr": 5e-7}, "languages": ["es", "ru"]}


def test_atomic_writes(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "héllo")
    assert (tmp_path / "a" / "b.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2], "ü": "ß"})
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2], "ü": "ß"}
    atomic_write_jsonl(tmp_path / "d.jsonl", [{"id": 1}, {"id": 2, "t": "日本"}])
    assert (tmp_path / "d.jsonl").read_text(encoding="utf-8") == '{"id": 1}\n{"id": 2, "t": "日本"}\n'
    assert sorted(os.listdir(tmp_path)) == ["a", "c.json", "d.jsonl"]  # no temp files left


def test_atomic_write_interrupted_keeps_old_file(tmp_path, monkeypatch):
    """A crash before `os.replace` leaves the old content and no temporary file."""
    target = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(target, [{"id": 1}])

    def boom(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(rd.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_jsonl(target, ({"id": i} for i in range(10)))
    assert target.read_text() == '{"id": 1}\n'
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


def test_create_layout_and_stages(tmp_path):
    run = RunDir(tmp_path / "run", CONFIG, seed=3)
    assert run.seed == 3 and run.config == CONFIG
    d = run.stage_dir(1, "generate")
    assert d == (tmp_path / "run" / "iter_1" / "generate").absolute() and d.is_dir()
    assert not run.is_done(1, "generate")
    run.set_iteration_start_model(1, "smollm2-135m-instruct")
    atomic_write_jsonl(d / "responses.jsonl", [{"id": 0}])
    run.mark_done(1, "generate", {"responses": d / "responses.jsonl", "count": 1})
    assert run.is_done(1, "generate")
    # Paths inside the run are stored relative, so a moved run still resolves.
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["iterations"]["1"]["stages"]["generate"]["outputs"] == {
        "responses": "./iter_1/generate/responses.jsonl",
        "count": 1,
    }
    assert manifest["iterations"]["1"]["start_model"] == "smollm2-135m-instruct"
    os.rename(tmp_path / "run", tmp_path / "moved")
    moved = RunDir(tmp_path / "moved", CONFIG, seed=3)
    assert moved.outputs(1, "generate") == {
        "responses": str((tmp_path / "moved" / "iter_1" / "generate" / "responses.jsonl").absolute()),
        "count": 1,
    }
    assert moved.iteration_start_model(1) == "smollm2-135m-instruct"
    assert moved.iteration_start_model(2) is None
    moved.set_iteration_start_model(2, moved.stage_dir(1, "export"))
    assert RunDir(tmp_path / "moved").iteration_start_model(2) == str(moved.stage_dir(1, "export"))
    assert moved.iterations() == [1, 2]
    assert moved.last_iteration_with("generate") == 1
    assert moved.last_iteration_with("train") is None
    assert moved.done_stages(1) == ["generate"]


def test_outputs_of_unfinished_stage(tmp_path):
    run = RunDir(tmp_path, CONFIG, seed=0)
    run.mark_done(1, "generate", {})
    with pytest.raises(StageNotDoneError, match=r"stage 'train' of iteration 1 is not done .*done: \['generate'\]"):
        run.outputs(1, "train")


def test_resume_with_different_config_names_keys(tmp_path):
    RunDir(tmp_path, CONFIG, seed=0).mark_done(1, "generate", {})
    changed = {**CONFIG, "dpo": {"beta": 0.2, "lr": 5e-7}, "languages": ["es"], "new_key": 1}
    with pytest.raises(RunConfigMismatchError) as err:
        RunDir(tmp_path, changed, seed=1)
    msg = str(err.value)
    for line in (
        "dpo.beta: 0.1 -> 0.2",
        'languages: ["es", "ru"] -> ["es"]',
        "new_key: <absent> -> 1",
        "seed: 0 -> 1",
        "allow_config_change=True",
    ):
        assert line in msg
    assert "dpo.lr" not in msg
    # With the override the new config is adopted, the change recorded, and finished stages kept.
    run = RunDir(tmp_path, changed, seed=1, allow_config_change=True)
    assert run.config == changed and run.seed == 1 and run.is_done(1, "generate")
    assert "dpo.beta: 0.1 -> 0.2" in run.manifest["config_changes"][0]["changes"]
    RunDir(tmp_path, changed, seed=1)  # now matches: resumes silently


def test_dataclass_config(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Sub:
        beta: float = 0.1
        langs: tuple = ("es",)

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        dpo: Sub = Sub()

    run = RunDir(tmp_path, Cfg(), seed=0)
    assert run.config == {"dpo": {"beta": 0.1, "langs": ["es"]}}
    RunDir(tmp_path, Cfg(), seed=0)
    with pytest.raises(RunConfigMismatchError, match=r"dpo\.beta: 0\.1 -> 0\.5"):
        RunDir(tmp_path, Cfg(Sub(beta=0.5)), seed=0)


def test_open_missing_run_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a lidr_jax run directory"):
        RunDir(tmp_path / "nope")
    run = RunDir(tmp_path, CONFIG)
    with pytest.raises(ValueError, match="must be a plain directory name"):
        run.stage_dir(1, "../escape")
    with pytest.raises(ValueError, match="iteration number must be a non-negative int"):
        run.stage_dir(-1, "train")
