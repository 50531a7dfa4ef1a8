"""End to end with a tiny random model: MGSM on 3 items of 2 languages from ../shared/data through
`evaluate_model` and through the command line (the scores of a random model are ~0; the plumbing,
the files and the metric shapes are what is tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lidr_jax.eval import evaluate
from lidr_jax.eval.evaluate import EvalConfig, evaluate_model

MGSM_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mgsm"
LANGS = ("en", "zh")


@pytest.fixture(scope="module")
def model():
    if not MGSM_DIR.is_dir():
        pytest.skip("../shared/data/mgsm is absent (shared data is only beside the repository checkout)")
    from eval_helpers import tiny_random_model

    return tiny_random_model()


def test_mgsm_evaluate_model(model, tmp_path):
    cfg = EvalConfig(
        benchmarks=("mgsm",),
        mgsm_languages=LANGS,
        limit=3,
        mgsm_dir=str(MGSM_DIR),
        mgsm_max_new_tokens=8,
        batch_size=8,
        progress=False,
    )
    metrics = evaluate_model(model, cfg, tmp_path)
    assert set(metrics) == {"mgsm_accuracy", "mgsm_off_target", "mgsm_prompt_too_long"}
    assert metrics["mgsm_prompt_too_long"] == dict.fromkeys(LANGS, 0)  # short questions: every one answered
    for values in (metrics["mgsm_accuracy"], metrics["mgsm_off_target"]):
        assert set(values) == set(LANGS)
        assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in values.values())
    for lang in LANGS:
        saved = json.loads((tmp_path / "mgsm" / f"{lang}.json").read_text(encoding="utf-8"))
        assert saved["n"] == 3 and len(saved["records"]) == 3
        assert [r["answer"] for r in saved["records"]] == [18.0, 3.0, 70000.0]  # the first 3 MGSM answers
        assert saved["accuracy"] == metrics["mgsm_accuracy"][lang]
        assert all(isinstance(r["output"], str) for r in saved["records"])
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_mgsm_cli(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "_load", lambda path: model)  # the CLI loads by path; use the tiny model
    monkeypatch.setattr(evaluate, "_check_model", lambda spec, flag: None)
    monkeypatch.setattr(evaluate, "_check_model_files", lambda spec, flag: None)
    rc = evaluate.main(
        [
            "mgsm",
            "--model",
            "tiny",
            "--data",
            str(MGSM_DIR),
            "--langs",
            "en,zh",
            "--limit",
            "3",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "8",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["lang", "accuracy", "off_target"]
    assert [line.split()[0] for line in lines[1:3]] == ["en", "zh"]
    assert (tmp_path / "mgsm" / "zh.json").is_file() and (tmp_path / "metrics.json").is_file()


def test_cli_help_and_errors(capsys):
    for sub in ("mgsm", "alpaca-outputs", "head-to-head"):
        with pytest.raises(SystemExit) as e:
            evaluate.main([sub, "--help"])
        assert e.value.code == 0
        assert f"python -m lidr_jax.evaluate {sub}" in capsys.readouterr().out
    assert evaluate.main(["head-to-head", "--out", "/tmp/never-written-h2h", "--judge-url", "http://x"]) == 2
    err = capsys.readouterr().err
    assert err == "error: head-to-head: give exactly one of --outputs-1 or --model-1\n"
