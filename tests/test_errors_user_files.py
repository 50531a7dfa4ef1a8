"""Issue 28's bad inputs: nothing of the user's touched, every check before any work, one line.

Each case runs a command in-process (`main(argv)`: iterate, dpo, export, pairs convert, evaluate) with
model loading replaced by a guard, and asserts the exact one-line message on stderr, exit code 2, the
time to fail (under 5 s, before any model loads), and, by the sha256 of every file under the test's
folder before and after, that no file of the user's changed (and nothing was created where the
command was refused).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from dpo_helpers import write_tiny_hf_dir

from lidr_jax.eval import evaluate
from lidr_jax.files import plain
from lidr_jax.formats.load import ModelFileError, load_pretrained
from lidr_jax.pipeline import export_run, models, runner
from lidr_jax.pipeline.config import load_run_config
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.train import cli, pairs

PROMPTS = {"en": ["Say hi.", "Name a fruit."], "es": ["Di hola.", "Nombra una fruta."]}
GOOD = {"prompt": "Say hi.", "chosen": "hi there", "rejected": "go away"}
LIMIT_S = 5.0  # every refusal here comes before any model loads


def _guard(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    monkeypatch.setattr(models, "load_pretrained", _guard)
    monkeypatch.setattr(cli, "load_pretrained", _guard)
    monkeypatch.setattr(evaluate, "_load", _guard)
    for name in ("load_pretrained", "restore_params", "model_from_run", "export_hf"):
        monkeypatch.setattr(export_run, name, _guard)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return write_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "model")


def sha256s(root: Path) -> dict[str, str]:
    """Every file under `root` by its sha256: what "nothing of the user's changed" compares."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def refused(main, argv, capsys, root: Path, limit_s: float = LIMIT_S) -> str:
    """`main(argv)` exits 2 within `limit_s` with one line on stderr, and no file under `root` changed
    or appeared; the line, without "error: " and the newline, is returned."""
    before = sha256s(root)
    t0 = time.perf_counter()
    assert main([str(a) for a in argv]) == 2
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert elapsed < limit_s, f"{elapsed:.1f} s"
    assert sha256s(root) == before
    return err[len("error: ") : -1]


# ----------------------------------------------------------------------------------------- iterate


@pytest.fixture()
def run_args(tmp_path, tiny_hf):
    """(argv builder, run directory): prompts in tmp_path/prompts, the tiny model, one iteration."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for lang, texts in PROMPTS.items():
        rows = [{"id": f"q{i}", "instruction": t} for i, t in enumerate(texts)]
        (prompts / f"{lang}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"

    def argv(*sets: str, run_dir: str | Path | None = run, model: Path = tiny_hf) -> list[str]:
        out = [] if run_dir is None else ["--run-dir", str(run_dir)]
        base = [f"model={model}", "languages=[en,es]", f"prompts.path={prompts}", "iterations=1"]
        for s in (*base, "plan.per_iteration=1", "plan.held_out=1", *sets):
            out += ["--set", s]
        return out

    return argv, run


def test_foreign_folder_is_not_a_run(run_args, capsys, tmp_path):
    argv, _ = run_args
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("# my report\n")
    (mine / "data.csv").write_text("a,b\n")
    for force in ([], ["--allow-config-change"]):
        err = refused(runner.main, [*argv(run_dir=mine), *force], capsys, tmp_path)
        assert err == (
            f"{mine} is not a lidr_jax run (no manifest.json) and is not empty: it holds data.csv and 1 more; "
            "nothing was written: pass --run-dir a new or empty folder, or an earlier run's"
        )


@pytest.mark.parametrize("how", ["--run-dir=", "--set run_dir="])
def test_empty_run_dir(run_args, capsys, tmp_path, monkeypatch, how):
    argv, _ = run_args
    monkeypatch.chdir(tmp_path)
    flag, _, value = how.partition(" ")
    extra = [flag] if not value else [flag, value]
    err = refused(runner.main, [*argv(run_dir=None), *extra], capsys, tmp_path)
    assert err == (
        "the run directory path is empty (run_dir: '' or --run-dir=), which would write the run into the current "
        "folder; give a folder, e.g. --run-dir runs/mine"
    )


def _model_copy(tiny_hf: Path, dest: Path) -> Path:
    shutil.copytree(tiny_hf, dest)
    return dest


def test_models_checked_before_the_run_directory(run_args, capsys, tmp_path, tiny_hf):
    """Remote code in the policy, a truncated safetensors file, remote code in ICR's reference model, a
    translator model that is not there: each refused before the run folder exists."""
    argv, run = run_args
    remote = _model_copy(tiny_hf, tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    truncated = _model_copy(tiny_hf, tmp_path / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    err = refused(runner.main, argv(model=remote), capsys, tmp_path)
    assert err.startswith(f"model: {remote / 'config.json'} has auto_map (AutoModel): this model needs Python code")
    err = refused(runner.main, argv(model=truncated), capsys, tmp_path)
    assert err == (
        f"model: {truncated / 'model.safetensors'}: not a readable safetensors file (Error while deserializing "
        "header: incomplete metadata, file not fully covered); it is truncated or damaged: copy or download it again"
    )
    err = refused(runner.main, argv("reward=icr", f"icr.reference_model={remote}"), capsys, tmp_path)
    assert err.startswith(f"icr.reference_model: {remote / 'config.json'} has auto_map (AutoModel)")
    missing = tmp_path / "translator"
    err = refused(runner.main, argv("lidr.translator.kind=model", f"lidr.translator.model={missing}"), capsys, tmp_path)
    assert err.startswith(f"lidr.translator.model: model '{missing}' not found: it is not a model directory")
    assert not run.exists()


def test_a_start_refused_at_its_first_load_leaves_no_trace(run_args, capsys, tmp_path, monkeypatch):
    """A model that fails only when loaded: the run folder created for it is removed, so the corrected
    command starts afresh instead of being refused as a configuration change."""
    argv, run = run_args

    def damaged(*args, **kwargs):
        raise ModelFileError("model.safetensors: tensor x cannot be read; copy or download the file again")

    monkeypatch.setattr(models, "load_pretrained", damaged)
    before = sha256s(tmp_path)
    assert runner.main(argv()) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == (
        "error: model.safetensors: tensor x cannot be read; copy or download the file again"
    )  # after the stage's progress lines (stderr)
    assert "Traceback" not in captured.err and f"the new run directory {run} was removed" in captured.out
    assert not run.exists() and sha256s(tmp_path) == before


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_endpoint_translator_checked_at_start(run_args, capsys, tmp_path):
    argv, run = run_args
    endpoint = ["lidr.translator.kind=endpoint", "lidr.translator.endpoint.model=m"]
    err = refused(runner.main, argv(*endpoint, "lidr.translator.endpoint.url=ftp:/nothing"), capsys, tmp_path)
    assert err == (
        "lidr.translator.endpoint: endpoint url 'ftp:/nothing' is not an http(s) URL (scheme 'ftp'); give e.g. "
        "http://localhost:8000/v1"
    )
    port = _closed_port()
    url = f"http://user:secret@127.0.0.1:{port}/v1"
    sets = [*endpoint, f"lidr.translator.endpoint.url={url}", "lidr.translator.endpoint.api_key_env="]
    err = refused(runner.main, argv(*sets), capsys, tmp_path)
    assert err == (
        f"lidr.translator.endpoint: http://user:***@127.0.0.1:{port}/v1/chat/completions cannot be reached "
        "(Connection refused); check the URL and that the server is running (nothing was started)"
    )
    assert not run.exists()


def test_print_config_masks_passwords(run_args, capsys):
    argv, _ = run_args
    url = "lidr.translator.endpoint.url=http://user:secret@host:1/v1"
    assert runner.main([*argv(url), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "url: http://user:***@host:1/v1" in out and "secret" not in out


def test_evaluation_data_checked_in_full(run_args, capsys, tmp_path):
    """A bad second MGSM row, an X-AlpacaEval instruction that is a number: named with file and line at start."""
    argv, run = run_args
    mgsm = tmp_path / "mgsm"
    mgsm.mkdir()
    (mgsm / "mgsm_en.tsv").write_text("What is 1+1?\t2\nWhat is 2+2?\tfour\n")
    sets = ["evaluation.benchmarks=[mgsm]", f"evaluation.mgsm_dir={mgsm}", "evaluation.mgsm_languages=[en]"]
    err = refused(runner.main, argv(*sets), capsys, tmp_path)
    assert err == f"evaluation: {mgsm / 'mgsm_en.tsv'}:2: expected 'question<TAB>number', got 'What is 2+2?\\tfour'"
    alpaca = tmp_path / "alpaca"
    alpaca.mkdir()
    (alpaca / "en.json").write_text(json.dumps([{"instruction": "Say hi."}, {"instruction": 5}], indent=1))
    sets = ["evaluation.benchmarks=[alpaca]", f"evaluation.alpaca_dir={alpaca}", "evaluation.alpaca_languages=[en]"]
    err = refused(runner.main, argv(*sets), capsys, tmp_path)
    assert err == (
        f"evaluation: {alpaca / 'en.json'}:5: item 2 has an 'instruction' that is not a string (int); each item is "
        "an object whose 'instruction' is a string"
    )
    assert not run.exists()


def test_prompt_path_missing_or_a_file(run_args, capsys, tmp_path):
    argv, run = run_args
    missing = tmp_path / "prompt"
    err = refused(runner.main, argv(f"prompts.path={missing}"), capsys, tmp_path)
    assert err == (
        f"prompts.path: '{missing}' does not exist; give a folder of {{lang}}.jsonl files (or a data file with "
        "prompts.language_column set)"
    )
    file = tmp_path / "prompts" / "en.jsonl"
    err = refused(runner.main, argv(f"prompts.path={file}"), capsys, tmp_path)
    assert err == (
        f"prompts.path: {file} is a file, not a folder of {{lang}}.jsonl files; a single file needs "
        "prompts.language_column (its column of language codes), or put {lang} in the path (one file per language)"
    )
    assert not run.exists()


def test_yaml_duplicate_keys_and_alias_bomb(run_args, capsys, tmp_path):
    argv, run = run_args
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 1\ndpo:\n  beta: 0.1\nseed: 2\n")
    err = refused(runner.main, ["--config", twice, *argv()], capsys, tmp_path)
    assert err == f"{twice}:4: the key 'seed' is given twice (first on line 1); keep one"
    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    bomb.write_text("\n".join(lines) + "\n")
    assert len(bomb.read_bytes()) < 400  # 9**9 = 387 million strings once expanded
    err = refused(runner.main, ["--config", bomb, *argv()], capsys, tmp_path, limit_s=1.0)
    assert err == (
        f"{bomb}:1: the document's aliases (*name) expand to more than 100,000 values (or contain themselves); "
        "a config needs far fewer: write the values out instead of nesting aliases"
    )
    assert not run.exists()


def test_manifest_that_is_a_folder(run_args, capsys, tmp_path):
    argv, run = run_args
    (run / "manifest.json").mkdir(parents=True)
    err = refused(runner.main, argv(), capsys, tmp_path)
    assert err.startswith(f"{run / 'manifest.json'} is a folder, not a run manifest; it records which stages are done")


def test_non_finite_learning_rate(run_args, capsys, tmp_path):
    argv, run = run_args
    err = refused(runner.main, argv("dpo.learning_rate=.inf"), capsys, tmp_path)
    assert err == "dpo.learning_rate=inf: must be a finite number"
    assert not run.exists()


def test_redo_of_a_damaged_unfinished_stage_reruns_it(run_args, capsys, tmp_path, monkeypatch):
    """The advice of a damaged metrics file (--redo iter_K/train) works on a stage that is not done: its
    files are deleted and it runs again (here up to the first model load, which fails on purpose)."""
    argv, run = run_args
    cfg = load_run_config(None, [a for a in argv() if a != "--set"][2:], str(run))
    RunDir(run, config=plain(cfg), seed=cfg.seed, ignore=("run_dir", "metrics", "compilation_cache"))
    train = run / "iter_1" / "train"
    train.mkdir(parents=True)
    (train / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')

    def stop(*args, **kwargs):
        raise ModelFileError("stopped at the first model load")

    monkeypatch.setattr(models, "load_pretrained", stop)
    assert runner.main([*argv(), "--redo", "iter_1/train"]) == 2
    captured = capsys.readouterr()
    assert "--redo iter_1/train: the stage was not finished; deleting its files to run it from the start" in (
        captured.out
    )
    assert captured.err.splitlines()[-1] == "error: stopped at the first model load" and "Traceback" not in captured.err
    assert not train.exists() and (run / "manifest.json").is_file()


# --------------------------------------------------------------------------------------- dpo command


@pytest.fixture()
def dpo_args(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text(json.dumps(GOOD) + "\n")
    return ["--model", model, "--pairs", pair_file, "--quiet"]


def test_dpo_out_that_is_the_users_folder(dpo_args, capsys, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    (out / "notes.txt").write_text("keep\n")
    err = refused(cli.main, [*dpo_args, "--out", out], capsys, tmp_path)
    assert err == (
        f"--out {out} is not empty and not an earlier run of this command (no dpo_config.json): it holds "
        "metrics.jsonl and 1 more; nothing was written: pass a new or empty folder"
    )


def test_dpo_out_empty_or_under_a_file(dpo_args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused(cli.main, [*dpo_args, "--out", ""], capsys, tmp_path)
    assert err == "--out is empty, which would write into the current folder; pass a folder, e.g. --out runs/dpo"
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    err = refused(cli.main, [*dpo_args, "--out", file / "run"], capsys, tmp_path)
    assert err == f"--out {file / 'run'} cannot be created: {file} is a file; pass a folder path under a folder"


@pytest.mark.parametrize("value", ["inf", ".inf"])  # a string read as a float, and YAML's infinity
def test_dpo_non_finite_learning_rate(dpo_args, capsys, tmp_path, value):
    err = refused(cli.main, [*dpo_args, "--out", tmp_path / "out", "--set", f"learning_rate={value}"], capsys, tmp_path)
    assert err == "dpo.learning_rate=inf: must be a finite number"


def test_dpo_weights_that_become_non_finite_are_not_exported(capsys, tmp_path, tiny_hf, monkeypatch):
    """Training that ends with a NaN in the weights (every loss finite: the last update is not checked by
    the loss) stops with one line and writes no model. The training itself is replaced by one that
    returns such weights (a real run with learning_rate=1e39, infinite in float32, ends the same way)."""
    monkeypatch.setattr(cli, "load_pretrained", load_pretrained)  # the tiny model loads for real
    monkeypatch.setattr(cli, "_reference", lambda *args, **kwargs: None)

    def train(model, *args, **kwargs):
        return SimpleNamespace(params=jax.tree.map(lambda p: p.at[0].set(jnp.nan), model.params))

    monkeypatch.setattr(cli.trainer, "train_checkpointed", train)
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text(json.dumps(GOOD) + "\n")
    out = tmp_path / "out"
    argv = ["--model", tiny_hf, "--pairs", pair_file, "--out", out, "--quiet"]
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: the trained weights are not finite (") and err.endswith(
        f"holds NaN or inf) although every loss was; no model was written to {out / 'model'}: rerun on a new "
        "--out with a lower dpo.learning_rate"
    )
    assert not (out / "model").exists()


# ------------------------------------------------------------------------------------------- export


def _fake_run(tmp_path: Path, tiny_hf: Path) -> RunDir:
    run = RunDir(tmp_path / "run", {"model": str(tiny_hf), "reward": "lidr", "languages": ["en", "fr"]}, seed=0)
    (run.stage_dir(1, "train") / "policy").mkdir()
    run.mark_done(1, "train", {"policy": str(run.stage_dir(1, "train") / "policy")})
    (run.stage_dir(1, "export") / "hf").mkdir()
    (run.stage_dir(1, "export") / "hf" / "model.safetensors").write_bytes(b"the run's own export")
    return run


def test_export_into_the_runs_own_export(capsys, tmp_path, tiny_hf):
    run = _fake_run(tmp_path, tiny_hf)
    out = run.path / "iter_1" / "export" / "hf"
    err = refused(export_run.main, [run.path, "--out", out, "--force", "--dtype", "float32"], capsys, tmp_path)
    assert err == (
        f"export destination {out} is inside the run directory {run.path}, whose folders belong to its stages (its "
        "manifest records what they hold); nothing was written: choose a folder outside the run"
    )


def test_export_out_under_a_file_or_empty(capsys, tmp_path, tiny_hf, monkeypatch):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    err = refused(export_run.main, [tiny_hf, "--out", file / "hf"], capsys, tmp_path)
    assert (
        err
        == f"export destination {file / 'hf'} cannot be created: {file} is a file; nothing was written: choose a folder"
    )
    monkeypatch.chdir(tmp_path)
    err = refused(export_run.main, [tiny_hf, "--out", ""], capsys, tmp_path)
    assert err == "--out is empty, which would write into the current folder; pass a new folder"


# ------------------------------------------------------------------------------------ pairs convert


def _pair_file(path: Path, second: dict) -> Path:
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(second) + "\n")
    return path


def test_convert_to_a_folder(capsys, tmp_path):
    src = _pair_file(tmp_path / "pairs.jsonl", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    err = refused(pairs.main, ["convert", src, "--to", "trl", out], capsys, tmp_path)
    assert err == f"OUT {out} is a folder; give a file path to write, e.g. {out / 'pairs.jsonl'}"


@pytest.mark.parametrize(
    "second, message",
    [
        (
            {**GOOD, "chosen": " "},
            "1 of 2 pairs teach DPO no preference: 1 with an empty chosen answer (line 2); fix or remove them, or "
            "pass --drop-degenerate to leave them out",
        ),
        (
            {**GOOD, "chosen": "go away"},
            "1 of 2 pairs teach DPO no preference: 1 whose chosen answer equals the rejected one (line 2); fix or "
            "remove them, or pass --drop-degenerate to leave them out",
        ),
        (
            {**GOOD, "chosen": [{"role": "wizard", "content": "hi"}]},
            ":2: `chosen` has a message with role 'wizard'; roles are system, user, assistant",
        ),
    ],
)
def test_convert_applies_the_dpo_commands_checks(capsys, tmp_path, second, message):
    src = _pair_file(tmp_path / "pairs.jsonl", second)
    out = tmp_path / "pairs.trl.jsonl"
    err = refused(pairs.main, ["convert", src, "--to", "trl", out], capsys, tmp_path)
    assert err == f"{src}{'' if message.startswith(':') else ': '}{message}"
    assert not out.exists()


def test_convert_can_drop_degenerate_pairs(capsys, tmp_path):
    src = _pair_file(tmp_path / "pairs.jsonl", {**GOOD, "chosen": ""})
    out = tmp_path / "pairs.trl.jsonl"
    assert pairs.main(["convert", str(src), "--to", "trl", str(out), "--drop-degenerate"]) == 0
    assert capsys.readouterr().err.startswith(f"warning: {src}: 1 of 2 pairs teach DPO no preference")
    assert [json.loads(line) for line in out.read_text().splitlines()] == [GOOD]


# ---------------------------------------------------------------------------------------- evaluate


@pytest.fixture()
def outputs(tmp_path):
    """Two alpaca-outputs folders for head-to-head (English, one instruction)."""
    dirs = []
    for name in ("a", "b"):
        d = tmp_path / name / "en"
        d.mkdir(parents=True)
        rows = [{"instruction": "Say hi.", "output": f"hi from {name}", "generator": name}]
        (d / "model_outputs.json").write_text(json.dumps(rows))
        dirs.append(d.parent)
    return ["head-to-head", "--outputs-1", dirs[0], "--outputs-2", dirs[1], "--langs", "en", "--judge-name", "j"]


def test_judge_url_that_is_not_http(outputs, capsys, tmp_path):
    argv = [*outputs, "--judge-url", "ftp:/nothing", "--out", tmp_path / "h2h"]
    err = refused(evaluate.main, argv, capsys, tmp_path)
    assert err == "endpoint url 'ftp:/nothing' is not an http(s) URL (scheme 'ftp'); give e.g. http://localhost:8000/v1"


def test_judge_password_is_masked(outputs, capsys, tmp_path):
    port = _closed_port()
    argv = [
        *outputs,
        "--judge-url",
        f"http://u:secret@127.0.0.1:{port}/v1",
        "--api-key-env",
        "",
        "--out",
        tmp_path / "o",
    ]
    err = refused(evaluate.main, argv, capsys, tmp_path)
    assert err.startswith(f"judge endpoint: http://u:***@127.0.0.1:{port}/v1/chat/completions cannot be reached (")
    assert "secret" not in err


def test_hanging_judge_says_so_and_gives_up(outputs, capsys, tmp_path):
    """A judge that accepts connections and never answers: a wait line at half the bound (10 s at the
    default 120 s), then one error line once --judge-timeout has passed."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # connections are accepted by the kernel; nothing is ever read or answered
    port = server.getsockname()[1]
    out = tmp_path / "h2h"
    argv = [*outputs, "--judge-url", f"http://127.0.0.1:{port}/v1", "--api-key-env", "", "--judge-timeout", "2"]
    try:
        t0 = time.perf_counter()
        assert evaluate.main([str(a) for a in [*argv, "--out", out]]) == 2
        elapsed = time.perf_counter() - t0
    finally:
        server.close()
    lines = capsys.readouterr().err.splitlines()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    assert lines[0] == (
        f"waiting for {url}: no answer after 1 s; each request gives up after 2 s (timeout_s) and retrying stops "
        "2 s after the first try (max_retry_time_s)"
    )
    assert lines[-1].startswith(f"error: endpoint {url} did not answer after 1 tries in 2 s (last error: ")
    assert len(lines) == 2 and 2.0 <= elapsed < 5.0


def test_mgsm_command_checks_every_row(capsys, tmp_path, tiny_hf):
    data = tmp_path / "mgsm"
    data.mkdir()
    (data / "mgsm_en.tsv").write_text("What is 1+1?\t2\nWhat is 2+2?\n")
    argv = ["mgsm", "--model", tiny_hf, "--data", data, "--langs", "en", "--out", tmp_path / "out"]
    err = refused(evaluate.main, argv, capsys, tmp_path)
    assert err == f"{data / 'mgsm_en.tsv'}:2: expected 'question<TAB>number', got 'What is 2+2?'"


def test_every_model_of_a_command_is_checked_before_work(capsys, tmp_path, tiny_hf, outputs):
    """The dpo command's --reference and head-to-head's --judge-model with remote code: refused before any
    model loads, as the policy is."""
    remote = _model_copy(tiny_hf, tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text(json.dumps(GOOD) + "\n")
    argv = ["--model", tiny_hf, "--reference", remote, "--pairs", pair_file, "--out", tmp_path / "out", "--quiet"]
    err = refused(cli.main, argv, capsys, tmp_path)
    assert err.startswith(f"--reference: {remote / 'config.json'} has auto_map (AutoModel): this model needs Python")
    err = refused(evaluate.main, [*outputs, "--judge-model", remote, "--out", tmp_path / "h2h"], capsys, tmp_path)
    assert err.startswith(f"--judge-model: {remote / 'config.json'} has auto_map (AutoModel): this model needs")


def test_what_a_kill_leaves_is_not_foreign(tmp_path):
    """A manifest (or dpo_config.json) whose write a kill cut before its rename leaves only our temp file:
    the folder is still taken as new."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".manifest.json.k1ll3d.tmp").write_text("{")
    assert RunDir(run, {"seed": 0}, seed=0).created
    out = tmp_path / "out"
    out.mkdir()
    (out / ".dpo_config.json.k1ll3d.tmp").write_text("{")
    cli.check_out(str(out))
