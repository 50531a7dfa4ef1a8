"""Issue 17's bad inputs not covered elsewhere: each is one line on stderr naming the cause, the file (and
line) and the fix, exit code 2, before any model loads and before anything is written, and nothing of
the user's lost. The DPO command (`python -m lidr_jax.dpo`) and the main job (`python -m
lidr_jax.iterate`) run in-process with model loading replaced by a guard that fails the test.

Also: every enumerated setting is refused with the one message of `settings.check_choice` (key, value,
choices), the DPO command's handling of pairs DPO can learn no preference from, and run files that
follow the umask.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from dpo_helpers import write_tiny_hf_dir

from lidr_jax.eval.evaluate import EvalConfig
from lidr_jax.formats.load import load_pretrained
from lidr_jax.methods.prompt_sets import PromptSourceConfig
from lidr_jax.methods.translator import TranslatorConfig
from lidr_jax.model.scoring import ScoringConfig
from lidr_jax.pipeline import models, runner
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.settings import SettingsError
from lidr_jax.train import cli
from lidr_jax.train.pairs import PairFormatError, PreferencePair, degenerate_reason, read_training_pairs

GOOD = {"prompt": "Say hi.", "chosen": "hi there", "rejected": "go away"}


class ModelLoaded(Exception):
    """Raised by the guards: a model load was reached."""


def _guard(*args, **kwargs):
    raise ModelLoaded("a model was loaded")


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    monkeypatch.setattr(cli, "load_pretrained", _guard)
    monkeypatch.setattr(models, "load_pretrained", _guard)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def write_lines(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ------------------------------------------------------------------------------- the DPO command


@pytest.fixture()
def dpo(tmp_path):
    """(model folder with a config.json, pair file with one good pair, --out path) and a runner that
    returns the one error line after asserting exit code 2 and that --out was not created."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    pairs = tmp_path / "pairs.jsonl"
    write_lines(pairs, [GOOD])
    out = tmp_path / "out"

    def fails(capsys, *extra, pairs_file=pairs, out_dir=out) -> str:
        argv = ["--model", str(model), "--pairs", str(pairs_file), "--out", str(out_dir), "--quiet", *extra]
        assert cli.main(argv) == 2
        err = one_line(capsys)
        assert not out.exists()
        return err

    return model, pairs, out, fails


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {**GOOD, "chosen": 5},
            "`chosen` must be a string or a non-empty list of {role, content} messages with "
            "string values, got 5; write the text as a JSON string",
        ),
        (
            {**GOOD, "rejected": [{"role": "assistant", "content": 7}]},
            "`rejected` must be a string or a non-empty "
            "list of {role, content} messages with string values, got [{'role': 'assistant', 'content': 7}]",
        ),
        ({"instruction": 3, "input": "", "output": ["a", "b"]}, "alpaca `instruction` must be a string, got 3"),
        (
            {"instruction": "x", "input": "", "output": ["a", "b"], "history": [["u", 4.5]]},
            "alpaca `history` must hold [user, assistant] string pairs, got ['u', 4.5]",
        ),
        ({"instruction": "x", "system": 1, "output": ["a", "b"]}, "alpaca `system` must be a string, got 1"),
    ],
)
def test_pair_content_that_is_not_text(dpo, capsys, record, message):
    _, pairs, _, fails = dpo
    write_lines(pairs, [GOOD, record])
    assert f"error: {pairs}:2: {message}" in fails(capsys)


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json"])
def test_non_utf8_pair_file_names_file_and_line(dpo, capsys, tmp_path, name):
    """A Latin-1 file: JSON Lines, or a JSON list (the line of the bad byte is named there too)."""
    _, _, _, fails = dpo
    pairs = tmp_path / name
    bad = {**GOOD, "chosen": "caf\u00e9"}
    if name.endswith(".jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (GOOD, bad))
    else:
        text = json.dumps([GOOD, bad], indent=1, ensure_ascii=False)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "caf" in t)
    pairs.write_bytes(text.encode("latin-1"))
    err = fails(capsys, pairs_file=pairs)
    assert f"error: {pairs}:{line}: not UTF-8 text (invalid continuation byte); save the file as UTF-8" in err
    assert line > 1 and pairs.read_bytes() == text.encode("latin-1")


def test_pair_file_that_is_a_folder(dpo, capsys, tmp_path):
    _, _, _, fails = dpo
    err = fails(capsys, pairs_file=tmp_path)
    assert f"pair file {tmp_path} is a folder; pass a .jsonl or .json file of pairs" in err


def test_missing_model_and_reference(dpo, capsys, tmp_path):
    model, _, _, fails = dpo
    err = fails(capsys, "--model", str(tmp_path / "modle"))  # argparse: the last --model wins
    assert f"model '{tmp_path / 'modle'}' not found. Accepted: a local Hugging Face model directory" in err
    err = fails(capsys, "--reference", str(tmp_path / "sft"))
    assert f"model '{tmp_path / 'sft'}' not found" in err


def test_out_that_is_a_file_is_kept(dpo, capsys, tmp_path):
    model, pairs, _, _ = dpo
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    assert cli.main(["--model", str(model), "--pairs", str(pairs), "--out", str(out)]) == 2
    assert f"--out {out} is a file; pass a folder" in one_line(capsys)
    assert out.read_text() == "mine\n"


def test_out_model_folder_of_the_users_is_refused_before_training(dpo, capsys, tmp_path):
    """OUT/model is where the trained model goes: a folder there that this command did not write is
    refused before any work, and kept (in a folder that is not an earlier run of this command, the
    folder itself is refused; in an earlier run's, the export check refuses the foreign model/)."""
    model, pairs, _, _ = dpo
    out = tmp_path / "work"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_text("the user's")
    assert cli.main(["--model", str(model), "--pairs", str(pairs), "--out", str(out)]) == 2
    err = one_line(capsys)
    assert (
        f"--out {out} is not empty and not an earlier run of this command (no dpo_config.json): it holds model" in err
    )
    (out / "dpo_config.json").write_text("{}")
    assert cli.main(["--model", str(model), "--pairs", str(pairs), "--out", str(out)]) == 2
    err = one_line(capsys)
    assert f"export destination {out / 'model'}" in err and "nothing was written" in err.lower()
    (out / "dpo_config.json").unlink()
    assert sorted(p.name for p in out.rglob("*")) == ["model", "weights.bin"]
    assert (out / "model" / "weights.bin").read_text() == "the user's"


def test_config_files_and_settings_of_the_dpo_command(dpo, capsys, tmp_path):
    _, _, _, fails = dpo
    err = fails(capsys, "--config", str(tmp_path))
    assert f"config file {tmp_path} is a folder; pass --config a YAML file" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert f"{empty} is empty; write the settings to change" in fails(capsys, "--config", str(empty))
    assert "dpo.seed must be >= 0, got -1" in fails(capsys, "--set", "seed=-1")
    err = fails(capsys, "--set", "export_dtype=fp16")
    assert "export_dtype must be one of ['bfloat16', 'float32'], got 'fp16'" in err
    err = fails(capsys, "--set", "dpo.compute.attention=flash")
    assert "dpo.compute.attention must be one of ['auto', 'xla', 'cudnn', 'splash'], got 'flash'" in err
    assert "checkpoint_keep must be >= 1, got 0" in fails(capsys, "--set", "checkpoint_keep=0")


# ----------------------------------------------------- pairs DPO learns no preference from


def degenerate_file(path):
    write_lines(
        path,
        [
            GOOD,
            {**GOOD, "chosen": "  "},  # empty chosen
            {**GOOD, "chosen": "go away ", "rejected": " go away"},  # identical after stripping
            {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "x"},  # identical
            {**GOOD, "rejected": ""},  # empty rejected: a real preference, kept
        ],
    )
    return path


def test_degenerate_reasons():
    assert degenerate_reason(PreferencePair("p", "", "b")) == "empty_chosen"
    assert degenerate_reason(PreferencePair("p", [{"role": "assistant", "content": " "}], "b")) == "empty_chosen"
    assert degenerate_reason(PreferencePair("p", "a", " a\n")) == "identical"
    assert degenerate_reason(PreferencePair("p", "a", [{"role": "assistant", "content": "a"}])) == "identical"
    assert degenerate_reason(PreferencePair("p", "a", "")) is None
    assert degenerate_reason(PreferencePair("p", "a", "b")) is None


def test_degenerate_pairs_are_counted_and_left_out(tmp_path):
    path = degenerate_file(tmp_path / "p.jsonl")
    kept, warning = read_training_pairs(path)
    assert [(p.chosen, p.rejected) for p in kept] == [("hi there", "go away"), ("hi there", "")]
    assert warning == (
        f"warning: {path}: 3 of 5 pairs teach DPO no preference: 1 with an empty chosen answer (line 2); "
        "2 whose chosen answer equals the rejected one (lines 3, 4); left out of training (an identical pair "
        "has a zero DPO gradient, an empty chosen answer teaches the model to stop at once); fix or remove "
        "them, or set drop_degenerate_pairs=false to train on them as TRL does"
    )
    kept, warning = read_training_pairs(path, drop_degenerate=False)
    assert len(kept) == 5 and warning.endswith("(lines 3, 4); trained on anyway (drop_degenerate_pairs=false)")
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([GOOD, GOOD]))
    assert read_training_pairs(clean) == ([PreferencePair("Say hi.", "hi there", "go away")] * 2, "")


def test_dpo_command_warns_before_loading_and_encodes_the_rest(tmp_path, capsys, monkeypatch):
    """The warning comes before the model loads; the trainer then sees the 2 kept pairs (stopped at the
    reference pass, which comes next)."""
    model = write_tiny_hf_dir(tmp_path / "tiny")
    pairs = degenerate_file(tmp_path / "p.jsonl")
    monkeypatch.setattr(cli, "load_pretrained", load_pretrained)  # the real loader, for this test only

    def stop(args, cfg, model, enc, *rest):
        raise ModelLoaded(f"{len(enc)} pairs encoded")

    monkeypatch.setattr(cli, "_reference", stop)
    with pytest.raises(ModelLoaded, match="^2 pairs encoded$"):
        cli.main(["--model", str(model), "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"warning: {pairs}: 3 of 5 pairs teach DPO no preference")
    assert err[1].startswith("pairs: 2 pairs;")


def test_a_file_of_degenerate_pairs_only_is_an_error(dpo, capsys):
    _, pairs, _, fails = dpo
    write_lines(pairs, [{**GOOD, "chosen": ""}, {**GOOD, "chosen": "x", "rejected": "x"}])
    err = fails(capsys)
    assert f"error: {pairs}: 2 of 2 pairs teach DPO no preference" in err
    assert "nothing is left to train on: fix the file, or set drop_degenerate_pairs=false" in err


# ------------------------------------------------------------------------------------- the main job


@pytest.fixture()
def job(tmp_path):
    """Prompt folder (en, es), a 'model' folder, and a runner of `python -m lidr_jax.iterate` that returns
    the one error line after asserting exit code 2 and that the run directory was not created."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for lang, text in (("en", "Say hi."), ("es", "Di hola.")):
        write_lines(prompts / f"{lang}.jsonl", [{"id": "q0", "instruction": text}, {"id": "q1", "instruction": text}])
    (tmp_path / "model").mkdir()
    run = tmp_path / "run"

    def fails(capsys, *sets) -> str:
        argv = ["--run-dir", str(run)]
        for s in (
            f"model={tmp_path / 'model'}",
            "languages=[en,es]",
            f"prompts.path={prompts}",
            "iterations=1",
            "plan.per_iteration=1",
            "plan.held_out=1",
            *sets,
        ):
            argv += ["--set", s]
        assert runner.main(argv) == 2
        err = one_line(capsys)
        assert not run.exists()
        return err

    return prompts, fails


def test_instruction_null_is_named(job, capsys):
    prompts, fails = job
    text = '{"id": "q0", "instruction": "Di hola."}\n{"id": "q1", "instruction": null}\n'
    (prompts / "es.jsonl").write_text(text)
    err = fails(capsys)
    assert f"{prompts / 'es.jsonl'}:2: 'instruction' is null; write the prompt's text there, or remove that" in err
    assert (prompts / "es.jsonl").read_text() == text


def test_non_utf8_prompt_file_is_named(job, capsys):
    prompts, fails = job
    data = '{"id": "q0", "instruction": "Di hola."}\n{"id": "q1", "instruction": "\u00bfQu\u00e9?"}\n'.encode("latin-1")
    (prompts / "es.jsonl").write_bytes(data)
    err = fails(capsys)
    assert f"{prompts / 'es.jsonl'}:2: not UTF-8 text (invalid start byte); save the file as UTF-8" in err
    assert (prompts / "es.jsonl").read_bytes() == data


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "lidr.translator.kind=google",
            "lidr.translator.kind must be one of ['policy', 'model', 'endpoint'], got 'google'",
        ),
        ("dpo.loss_type=kto", "dpo.loss_type must be one of ['sigmoid', 'robust', 'ipo', 'hinge'], got 'kto'"),
        (
            "dpo.compute.remat=some",
            "dpo.compute.remat must be one of ['none', 'full', 'dots', 'names', 'auto'], got 'some'",
        ),
        ("dpo.schedule=step", "dpo.schedule must be one of ['cosine', 'linear', 'constant'], got 'step'"),
        ("evaluation.benchmarks=[mgsm,gsm]", "evaluation.benchmarks[1] must be one of ['mgsm', 'alpaca'], got 'gsm'"),
        (
            "evaluation.mgsm_decoding=beam",
            "evaluation.mgsm_decoding must be one of ['lidr', 'icr', 'greedy'], got 'beam'",
        ),
        ("prompts.format=csv", "prompts.format must be one of ['auto', 'jsonl_dir', 'datasets'], got 'csv'"),
        ("dpo.seed=-1", "'dpo.seed' is not a setting: the run's `seed` + the iteration"),
    ],
)
def test_bad_choices_of_the_main_job(job, capsys, setting, message):
    _, fails = job
    assert f"error: {message}" in fails(capsys, setting)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TranslatorConfig(kind="google"), "kind must be one of ['policy', 'model', 'endpoint'], got 'google'"),
        (
            lambda: ScoringConfig(compute_dtype="fp16"),
            "compute_dtype must be one of ['float32', 'bfloat16'], got 'fp16'",
        ),
        (lambda: EvalConfig(benchmarks="gsm"), "benchmarks[0] must be one of ['mgsm', 'alpaca'], got 'gsm'"),
        (
            lambda: EvalConfig(alpaca_decoding="beam"),
            "alpaca_decoding must be one of ['lidr', 'icr', 'greedy'], got 'beam'",
        ),
        (lambda: PromptSourceConfig(check_split="test"), "check_split must be one of ['heldout', 'dev'], got 'test'"),
    ],
)
def test_bad_choices_from_python(make, message):
    """Built in Python (not from YAML), the same check and message, without the group's prefix."""
    with pytest.raises(SettingsError) as e:
        make()
    assert str(e.value) == message


# ----------------------------------------------------------------------------------- the umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        run = RunDir(tmp_path / "run", {"seed": 0}, seed=0)
        run.write_jsonl(run.path / "rows.jsonl", [{"a": 1}])
    finally:
        os.umask(old)
    for name in ("manifest.json", "rows.jsonl"):
        assert stat.S_IMODE((run.path / name).stat().st_mode) == 0o666 & ~umask, name


def test_pair_errors_are_pair_format_errors(tmp_path):
    """The error type the commands catch (main prints it as one line)."""
    path = tmp_path / "p.jsonl"
    write_lines(path, [{**GOOD, "chosen": None}])
    with pytest.raises(PairFormatError, match=r"p\.jsonl:1: `chosen` must be a string .* got None"):
        read_training_pairs(path)


# ------------------------------------------------------------------------------ the evaluate command


@pytest.fixture()
def evaluate_cmd(monkeypatch):
    """`python -m lidr_jax.evaluate` in-process with model loading guarded; returns the one error line."""
    from lidr_jax.eval import evaluate

    monkeypatch.setattr(evaluate, "_load", _guard)

    def fails(capsys, *argv) -> str:
        assert evaluate.main([str(a) for a in argv]) == 2
        return one_line(capsys)

    return fails


def test_evaluate_mgsm_checks_its_data_before_the_model_loads(evaluate_cmd, capsys, tmp_path):
    """Before, the MGSM files were read only after the model had loaded."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "mgsm"
    data.mkdir()
    (data / "mgsm_en.tsv").write_text("Half of 10?\t5\n")
    out = tmp_path / "out"
    base = ["mgsm", "--model", model, "--data", data, "--out", out]
    err = evaluate_cmd(capsys, *base, "--langs", "en,de")
    assert f"MGSM file {data / 'mgsm_de.tsv'} not found; point the data path at a folder of mgsm_{{lang}}.tsv" in err
    (data / "mgsm_xx.tsv").write_text("Half of 10?\t5\n")
    assert "no MGSM instruction for language 'xx'" in evaluate_cmd(capsys, *base, "--langs", "en,xx")
    err = evaluate_cmd(capsys, *base, "--langs", "en", "--few-shot-k", "2", "--few-shot-data", tmp_path / "shots")
    assert f"MGSM file {tmp_path / 'shots' / 'mgsm_en.tsv'} not found" in err
    (data / "mgsm_en.tsv").write_text("Half of 10?\tfive\n")
    assert f"{data / 'mgsm_en.tsv'}:1: expected 'question<TAB>number'" in evaluate_cmd(capsys, *base, "--langs", "en")
    assert not out.exists()


def test_evaluation_data_that_is_not_utf8_or_not_json_is_named(evaluate_cmd, capsys, tmp_path):
    """Before, a non-UTF-8 MGSM or X-AlpacaEval file and a malformed X-AlpacaEval file gave a message
    that did not name the file."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    mgsm, xa = tmp_path / "mgsm", tmp_path / "xa"
    mgsm.mkdir()
    xa.mkdir()
    (mgsm / "mgsm_de.tsv").write_bytes("Hälfte von 10?\t5\n".encode() + "Größe?\t3\n".encode("latin-1"))
    err = evaluate_cmd(capsys, "mgsm", "--model", model, "--data", mgsm, "--out", tmp_path / "o1", "--langs", "de")
    assert f"{mgsm / 'mgsm_de.tsv'}:2: not UTF-8 text (invalid start byte); save the file as UTF-8" in err
    (xa / "es.json").write_bytes('[{"instruction": "¿Qué?"}]'.encode("latin-1"))
    err = evaluate_cmd(
        capsys, "alpaca-outputs", "--model", model, "--data", xa, "--out", tmp_path / "o2", "--langs", "es"
    )
    assert f"{xa / 'es.json'}:1: not UTF-8 text (invalid start byte); save the file as UTF-8" in err
    (xa / "es.json").write_text('[{"instruction": "hola"},\n]')
    err = evaluate_cmd(
        capsys, "alpaca-outputs", "--model", model, "--data", xa, "--out", tmp_path / "o2", "--langs", "es"
    )
    assert f"{xa / 'es.json'}:2: malformed JSON (Expecting value at column 1)" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_evaluate_checks_every_model_and_out_before_any_model_loads(evaluate_cmd, capsys, tmp_path):
    data = tmp_path / "xa"
    data.mkdir()
    (data / "en.json").write_text(json.dumps([{"instruction": "Say hi."}]))
    err = evaluate_cmd(capsys, "alpaca-outputs", "--model", tmp_path / "modle", "--data", data, "--out", tmp_path / "o")
    assert f"--model: model '{tmp_path / 'modle'}' not found" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    err = evaluate_cmd(capsys, "alpaca-outputs", "--model", "x", "--data", data, "--out", notes)
    assert f"--out {notes} is a file; pass a folder for the results" in err and notes.read_text() == "mine\n"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "o"
    err = evaluate_cmd(capsys, "alpaca-outputs", "--model", model, "--data", data, "--langs", "en,de", "--out", out)
    assert f"X-AlpacaEval file {data / 'de.json'} not found" in err
    h2h = ["head-to-head", "--data", data, "--langs", "en", "--out", tmp_path / "h"]
    # head-to-head: the second model and a local judge are found missing before the first one generates
    err = evaluate_cmd(capsys, *h2h, "--model-1", model, "--model-2", tmp_path / "m2", "--judge-model", model)
    assert f"--model-2: model '{tmp_path / 'm2'}' not found" in err
    err = evaluate_cmd(capsys, *h2h, "--model-1", model, "--model-2", model, "--judge-model", tmp_path / "judge")
    assert f"--judge-model: model '{tmp_path / 'judge'}' not found" in err
    assert not (tmp_path / "h").exists() and not (tmp_path / "o").exists()


def test_evaluation_files_of_the_main_job_are_checked_before_the_model_loads(job, capsys, tmp_path):
    """Before, only the folder was checked: a missing language file failed after the model had loaded."""
    _, fails = job
    mgsm = tmp_path / "mgsm"
    mgsm.mkdir()
    (mgsm / "mgsm_en.tsv").write_text("Half of 10?\t5\n")
    sets = ("evaluation.benchmarks=[mgsm]", f"evaluation.mgsm_dir={mgsm}")
    err = fails(capsys, *sets, "evaluation.mgsm_languages=[en,de]")
    assert f"error: evaluation: MGSM file {mgsm / 'mgsm_de.tsv'} not found; point the data path at a folder" in err
    (mgsm / "mgsm_xx.tsv").write_text("Half of 10?\t5\n")
    err = fails(capsys, *sets, "evaluation.mgsm_languages=[en,xx]")
    assert "error: evaluation: no MGSM instruction for language 'xx'" in err
