"""`python -m lidr_jax.iterate` with inputs it must refuse: one line on stderr naming the cause, the file
and the fix, exit code 2, before any model loads and before the run directory is created, and nothing
of the user's lost. In-process (`main(argv)`) with `load_pretrained` replaced by a guard, so loading a
model fails the test instead of taking time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, install_wheel
from dpo_helpers import write_tiny_hf_dir

from lidr_jax.pipeline import models, runner
from lidr_jax.pipeline.run_dir import RunDir

PROMPTS = {"en": ["Say hi.", "Name a fruit."], "es": ["Di hola.", "Nombra una fruta."]}


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def guard(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_pretrained", guard)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny Hugging Face model folder (config, safetensors, tokenizer): it passes every check that reads
    no weights; loading it is what the guard refuses."""
    return write_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def setup(tmp_path, tiny_hf):
    """(prompt folder, a model folder that passes the checks, run directory path) under tmp_path."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for lang, texts in PROMPTS.items():
        rows = [{"id": f"q{i}", "instruction": t} for i, t in enumerate(texts)]
        (prompts / f"{lang}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prompts, tiny_hf, tmp_path / "run"


def args(prompts: Path, model: Path, run: Path, *sets: str) -> list[str]:
    out = ["--run-dir", str(run)]
    for s in (
        f"model={model}",
        "languages=[en,es]",
        f"prompts.path={prompts}",
        "iterations=1",
        "plan.per_iteration=1",
        "plan.held_out=1",
        *sets,
    ):
        out += ["--set", s]
    return out


def fails(argv: list[str], capsys) -> str:
    """Run the command; it must exit 2 with one line on stderr, which is returned."""
    assert runner.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_config_is_a_folder(setup, capsys, tmp_path):
    prompts, model, run = setup
    err = fails(["--config", str(tmp_path), *args(prompts, model, run)], capsys)
    assert f"config file {tmp_path} is a folder; pass --config a YAML file" in err
    assert not run.exists()


def test_empty_config_file_does_not_run_the_defaults(setup, capsys, tmp_path):
    prompts, model, run = setup
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    err = fails(["--config", str(empty), *args(prompts, model, run)], capsys)
    assert f"{empty} is empty; write the settings to change" in err
    assert not run.exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("seed=-1", "seed must be >= 0, got -1"),
        ("checkpoint_every=0", "checkpoint_every must be >= 1, got 0"),
    ],
)
def test_settings_out_of_range(setup, capsys, setting, message):
    prompts, model, run = setup
    assert message in fails(args(prompts, model, run, setting), capsys)
    assert not run.exists()


def test_mistyped_model_creates_no_run_directory(setup, capsys, tmp_path):
    """A typo'd model name fails before the run directory exists, so the corrected rerun is not refused
    as a change of config."""
    prompts, model, run = setup
    err = fails(args(prompts, model, run, f"model={tmp_path / 'modle'}"), capsys)
    assert f"model: model '{tmp_path / 'modle'}' not found" in err and "lidr_jax never downloads" in err
    assert not run.exists()


def test_icr_scorer_models_are_checked_first(setup, capsys, tmp_path):
    prompts, model, run = setup
    err = fails(args(prompts, model, run, "reward=icr"), capsys)
    assert "icr.reference_model is required with reward=icr" in err and "set icr.reference_model=PATH" in err
    err = fails(args(prompts, model, run, "reward=icr", f"icr.reference_model={tmp_path / 'sft'}"), capsys)
    assert f"icr.reference_model: model '{tmp_path / 'sft'}' not found" in err
    assert not run.exists()


def test_evaluation_data_folder_is_checked_first(setup, capsys, tmp_path):
    prompts, model, run = setup
    missing = tmp_path / "mgsm"
    err = fails(args(prompts, model, run, "evaluation.benchmarks=[mgsm]", f"evaluation.mgsm_dir={missing}"), capsys)
    assert f"evaluation.mgsm_dir: '{missing}' is not a folder" in err
    assert not run.exists()


def test_corrupt_manifest_is_named_and_kept(setup, capsys):
    prompts, model, run = setup
    run.mkdir()
    (run / "manifest.json").write_text('{"version": 1, "config": {')
    err = fails(args(prompts, model, run), capsys)
    assert f"{run / 'manifest.json'}:1: the run manifest is not valid JSON" in err
    assert "restore it from a backup, or start over in a new run directory" in err
    assert (run / "manifest.json").read_text() == '{"version": 1, "config": {'  # nothing rewritten


def test_run_directory_that_is_a_file(setup, capsys):
    prompts, model, run = setup
    run.write_text("my notes\n")
    err = fails(args(prompts, model, run), capsys)
    assert f"{run} is a file, not a run directory; pass --run-dir a new folder" in err
    assert run.read_text() == "my notes\n"


def test_read_only_run_directory(setup, tmp_path):
    """As a user who cannot write the folder (root writes anywhere, so a root test runs as nobody, in a
    folder nobody can reach: pytest's own temporary folder is private to root)."""
    prompts, model, _ = setup
    base = Path(tempfile.mkdtemp(prefix="lidr-ro-"))
    try:
        base.chmod(0o755)
        shutil.copytree(prompts, base / "prompts")
        shutil.copytree(model, base / "model")
        for f in (base / "model").iterdir():
            f.chmod(0o644)  # readable by the user the command runs as
        run = base / "run"
        run.mkdir()
        (run / "notes.txt").write_text("keep me\n")
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: no way to be a user who cannot write")
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        else:
            run.chmod(0o555)
            prefix = []
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu", HOME=str(base))
        res = subprocess.run(
            [*prefix, sys.executable, "-m", "lidr_jax.iterate", *args(base / "prompts", base / "model", run)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        run.chmod(0o755)
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"{run} is not writable (Permission denied), so the run directory {run} cannot be" in res.stderr
        assert "chmod u+w" in res.stderr and res.stderr.count("\n") == 1
        assert sorted(os.listdir(run)) == ["notes.txt"] and (run / "notes.txt").read_text() == "keep me\n"
    finally:
        shutil.rmtree(base)


def test_redo_needs_a_finished_stage(setup, capsys):
    prompts, model, run = setup
    err = fails([*args(prompts, model, run), "--redo", "iter_1/train"], capsys)
    assert f"--redo: {run} holds no run yet, so there is nothing to redo" in err
    assert not run.exists()
    err = fails([*args(prompts, model, run), "--redo", "iter_1/trian"], capsys)
    assert "--redo 'iter_1/trian': expected iter_K/STAGE" in err and "e.g. --redo iter_1/train" in err


def test_a_moved_run_directory_resumes(setup, tmp_path):
    """run_dir is where the run lives, not part of what it computes: a moved run is the same run."""
    config = {"run_dir": str(tmp_path / "old"), "seed": 0, "dpo": {"beta": 0.1}}
    RunDir(tmp_path / "old", config, seed=0, ignore=("run_dir",))
    (tmp_path / "old").rename(tmp_path / "new")
    moved = RunDir(tmp_path / "new", {**config, "run_dir": str(tmp_path / "new")}, seed=0, ignore=("run_dir",))
    assert moved.manifest["config_changes"] == []


def test_installed_package_runs_from_anywhere(tmp_path):
    """A wheel built from the checkout (not an editable install) carries the default config: `--help`
    and `--print-config` work from another directory with only the installed files on the path."""
    site = install_wheel(tmp_path)
    assert (site / "lidr_jax" / "pipeline" / "default.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    where = "from lidr_jax.pipeline.config import DEFAULT_CONFIG; print(DEFAULT_CONFIG)"
    for command, expected in (
        (["-c", where], str(site / "lidr_jax" / "pipeline" / "default.yaml")),  # the wheel's, not the checkout's
        (["-m", "lidr_jax.iterate", "--help"], "--redo iter_K/STAGE"),
        (["-m", "lidr_jax.iterate", "--print-config"], "model: smollm2-135m-instruct"),
    ):
        res = subprocess.run(
            [sys.executable, *command],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0 and expected in res.stdout, res.stderr[-2000:]
    assert not (elsewhere / "runs").exists()
