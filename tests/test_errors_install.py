"""Issue 17, case 4: a non-editable install runs the main job. A wheel built from the checkout, unpacked
as pip installs it (only the wheel's files on the path, no checkout), runs a one-iteration tiny LIDR job
from another directory, on the default config and the default prompts, which must be package data.
(test_run_errors checks `--help` and `--print-config` from the same kind of install.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import install_wheel
from test_iterate import base_args, prompt_dir, scripted_model_dir  # noqa: F401  (fixtures used below)


def test_a_wheel_runs_one_tiny_iteration_from_another_directory(scripted_model_dir, prompt_dir, tmp_path):  # noqa: F811
    site = install_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = elsewhere / "run"
    # base_args gives a tiny LIDR iteration; the prompts are the package's own (prompts.path=default).
    args = [*base_args(scripted_model_dir, prompt_dir, run), "--set", "prompts.path=default"]
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    env.pop("LIDR_JAX_CRASH_AT", None)
    res = subprocess.run(
        [sys.executable, "-m", "lidr_jax.iterate", *args],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["prompts"]["path"] == "default"
    assert {"generate", "translate", "pairs", "train", "export", "check"} <= set(manifest["iterations"]["1"]["stages"])
    assert (run / "iter_1" / "export" / "hf" / "config.json").is_file()
    default = site / "lidr_jax" / "methods" / "prompts" / "default" / "en.jsonl"
    default_ids = {json.loads(line)["id"] for line in default.read_text().splitlines() if line.strip()}
    generated = [json.loads(x) for x in (run / "iter_1" / "generate" / "generations.jsonl").read_text().splitlines()]
    assert {g["lang"] for g in generated} == {"en", "es", "fr"}
    assert {g["id"] for g in generated} <= default_ids  # the wheel's prompts (prompt_dir's ids are q0, q1, ...)
