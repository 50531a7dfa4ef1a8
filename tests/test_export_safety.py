"""Export never loses data, never runs a model's own code, and fails on bad input with one line.

Each case runs the command (`lidr_jax.pipeline.export_run.main`, what `python -m lidr_jax.export`
runs) and asserts the message on stderr, exit code 2, that the user's files are all still there, and,
for the checks that must come before any model work, that no model was loaded: the loaders are
replaced by functions that fail the test if called.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest
import yaml
from test_load_errors import _write_gguf

import lidr_jax.pipeline.export_run as export_run
from lidr_jax.formats.export import EXPORT_MARK, MODEL_CARD, ExportError, check_destination, export_hf
from lidr_jax.formats.load import load_pretrained
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.train.checkpoint import save_params

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: what "nothing was lost" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading any model fails the test: the checks under test must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("load_pretrained", "restore_params", "model_from_run", "export_hf"):
        monkeypatch.setattr(export_run, name, forbidden)


def _fail(argv, capsys) -> str:
    """Run the command, expect exit code 2 and one line on stderr; return that line."""
    t0 = time.perf_counter()
    assert export_run.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert time.perf_counter() - t0 < 5.0  # checks only: no model, no jit
    return err


def _run_with_policy(tmp_path, model_dir) -> RunDir:
    base = load_pretrained(model_dir)
    run = RunDir(
        tmp_path / "run",
        {"model": str(model_dir), "reward": "lidr", "dominant": "en", "languages": ["en", "fr", "ru"]},
        seed=0,
    )
    trained = jax.tree.map(lambda p: p * 1.5, base.params)
    policy = save_params(run.stage_dir(1, "train") / "policy", trained, base.config)
    run.mark_done(1, "train", {"policy": str(policy), "stats": {"steps": 3}})
    return run


# ------------------------------------------------------------------------------- destinations


def test_destination_that_is_a_file_is_refused_and_kept(tiny_llama_dir, tmp_path, capsys, no_model_work):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    err = _fail([tiny_llama_dir, "--out", target], capsys)
    assert f"export destination {target} is a file, not a folder; nothing was written" in err
    assert target.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing renamed aside


def test_destination_that_is_the_source_model_is_refused(tiny_llama_dir, tmp_path, capsys, no_model_work):
    before = _tree(tiny_llama_dir)
    err = _fail([tiny_llama_dir, "--out", tiny_llama_dir, "--force"], capsys)
    assert f"export destination {tiny_llama_dir} is the source; writing there would delete it" in err
    assert _tree(tiny_llama_dir) == before


def test_destination_that_is_the_run_or_holds_it_is_refused(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    run = _run_with_policy(tmp_path, tiny_llama_dir)
    before = _tree(tmp_path)
    for name in ("load_pretrained", "restore_params", "model_from_run", "export_hf"):
        monkeypatch.setattr(export_run, name, lambda *a, **k: pytest.fail("model loaded"))
    err = _fail([run.path, "--out", run.path, "--force"], capsys)
    assert f"export destination {run.path} is the source; writing there would delete it" in err
    err = _fail([run.path, "--out", tmp_path, "--force"], capsys)
    assert f"export destination {tmp_path} holds the source {run.path}" in err
    monkeypatch.chdir(run.path / "iter_1")  # `--out ..` from inside the run
    err = _fail([run.path, "--out", "..", "--force"], capsys)
    assert "holds the source" in err or "is the source" in err
    assert _tree(tmp_path) == before


def test_current_directory_is_refused(tiny_llama_dir, tmp_path, capsys, monkeypatch, no_model_work):
    (tmp_path / "thesis.tex").write_text("chapter 1")
    monkeypatch.chdir(tmp_path)
    err = _fail([tiny_llama_dir, "--out", "."], capsys)
    assert f"export destination {tmp_path} is a folder that holds thesis.tex and is not an earlier lidr_jax" in err
    assert _tree(tmp_path) == {"thesis.tex": b"chapter 1"}


def test_non_empty_folder_is_refused_even_with_force(tiny_llama_dir, tmp_path, capsys, no_model_work):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("a")
    (out / "sub" / "b.bin").write_bytes(b"\0\1")
    before = _tree(out)
    err = _fail([tiny_llama_dir, "--out", out, "--force"], capsys)
    assert "holds a.txt, sub and is not an earlier lidr_jax export; nothing was written" in err
    assert _tree(out) == before


def test_earlier_export_needs_force_and_must_hold_only_its_files(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export_run.main([str(tiny_llama_dir), "--out", str(out), "--dtype", "float32"]) == 0
    capsys.readouterr()
    first = _tree(out)
    assert json.loads((out / EXPORT_MARK).read_text())["written_by"] == "lidr_jax"

    err = _fail([tiny_llama_dir, "--out", out], capsys)
    assert f"export destination {out} holds an earlier lidr_jax export; nothing was written: pass --force" in err
    assert _tree(out) == first

    (out / "my_eval.json").write_text("{}")
    err = _fail([tiny_llama_dir, "--out", out, "--force"], capsys)
    assert "also holds my_eval.json, which the export did not write" in err
    assert (out / "my_eval.json").read_text() == "{}"

    (out / "my_eval.json").unlink()
    assert export_run.main([str(tiny_llama_dir), "--out", str(out), "--force"]) == 0  # bfloat16 this time
    assert _tree(out) != first and json.loads((out / EXPORT_MARK).read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left


def test_the_library_replaces_an_earlier_export_only_when_asked(tiny_model, tmp_path):
    out = export_hf(tiny_model, tmp_path / "hf", dtype="float32")
    before = _tree(out)
    with pytest.raises(ExportError, match=r"replace=True"):
        export_hf(tiny_model, out)
    assert _tree(out) == before
    export_hf(tiny_model, out, replace=True)  # bfloat16 this time
    assert _tree(out) != before


def test_empty_folder_is_used(tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    out = export_hf(tiny_model, tmp_path / "empty")
    assert (out / "model.safetensors").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_failed_export_leaves_no_temp_and_keeps_the_earlier_export(tiny_model, tmp_path, monkeypatch):
    out = export_hf(tiny_model, tmp_path / "hf")
    before = _tree(out)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tiny_model.tokenizer.hf), "save_pretrained", broken)
    with pytest.raises(OSError, match="No space left on device"):
        export_hf(tiny_model, out, dtype="float32", replace=True)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_killed_exports_temp_folder_is_removed_by_the_next_export(tiny_llama_dir, tmp_path):
    """SIGKILL an export while it writes; the next export beside it removes what the killed one left."""
    script = textwrap.dedent(
        f"""
        import time
        import lidr_jax.formats.export as ex
        from lidr_jax.formats.load import load_pretrained

        write = ex._write_weights

        def slow(*args):
            out = write(*args)
            print("weights written", flush=True)
            time.sleep(600)
            return out

        ex._write_weights = slow
        ex.export_hf(load_pretrained({str(tiny_llama_dir)!r}), {str(tmp_path / "hf")!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "weights written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert left == [f".hf.lidr-export-{socket.gethostname()}-{proc.pid}.tmp"], left
    # A temp folder of a live process (this one's parent) is another export in progress: kept.
    alive = tmp_path / f".hf.lidr-export-{socket.gethostname()}-{os.getppid()}.tmp"
    alive.mkdir()
    export_hf(load_pretrained(tiny_llama_dir), tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", alive.name])


def test_an_export_set_aside_by_a_killed_swap_is_put_back(tiny_llama_dir, tmp_path, capsys):
    """Killed between moving the earlier export aside and renaming the new one in: the next call puts
    the earlier export back and removes the unfinished one."""
    out = tmp_path / "hf"
    assert export_run.main([str(tiny_llama_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    before = _tree(out)
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    prefix = f".hf.lidr-export-{socket.gethostname()}-{pid}"
    out.rename(tmp_path / f"{prefix}.old")
    (tmp_path / f"{prefix}.tmp").mkdir()
    err = _fail([tiny_llama_dir, "--out", out], capsys)
    assert f"export destination {out} holds an earlier lidr_jax export; nothing was written: pass --force" in err
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_check_destination_is_a_library_function(tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        check_destination(tmp_path / "x")
    assert check_destination(tmp_path / "new") == (tmp_path / "new").resolve()


# ----------------------------------------------------------------------- checks before model work


def test_bad_iteration_fails_before_the_model_loads(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    run = _run_with_policy(tmp_path, tiny_llama_dir)
    for name in ("load_pretrained", "restore_params", "model_from_run", "export_hf"):
        monkeypatch.setattr(export_run, name, lambda *a, **k: pytest.fail("model loaded"))
    err = _fail([run.path, "--iteration", "3", "--out", tmp_path / "out"], capsys)
    assert f"--iteration 3: {run.path} has no finished training stage for iteration 3 (trained: 1;" in err
    err = _fail([run.path, "--iteration", "-1", "--out", tmp_path / "out"], capsys)
    assert "--iteration -1: iterations are numbered from 0" in err
    # A policy the manifest names but that is gone from disk.
    policy = Path(run.outputs(1, "train")["policy"])
    policy.rename(policy.with_name("moved"))
    err = _fail([run.path, "--out", tmp_path / "out"], capsys)
    assert f"{policy}: iteration 1's trained policy is missing" in err
    assert not (tmp_path / "out").exists()


def test_bad_max_shard_size_fails_before_the_model_loads(tiny_llama_dir, tmp_path, capsys, no_model_work):
    with pytest.raises(SystemExit) as info:
        export_run.main([str(tiny_llama_dir), "--out", str(tmp_path / "out"), "--max-shard-size", "2 parsecs"])
    assert info.value.code == 2
    assert "max_shard_size='2 parsecs' is not a size; write e.g. 2GB" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b'{"config": ', b'{"config": "caf\xe9"}'])
def test_corrupt_manifest_is_one_line(tmp_path, capsys, no_model_work, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_bytes(content)
    err = _fail([tmp_path / "run", "--out", tmp_path / "out"], capsys)
    assert f"error: {tmp_path / 'run' / 'manifest.json'}" in err and "run manifest" in err


def test_missing_model_is_one_line(tmp_path, capsys, no_model_work):
    err = _fail([tmp_path / "nothing", "--out", tmp_path / "out"], capsys)
    assert "not found. Accepted: a local Hugging Face model directory" in err


# ------------------------------------------------------------------------- bad model inputs (CLI)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_truncated_safetensors_names_the_file(tiny_llama_dir, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    err = _fail([model, "--out", tmp_path / "out"], capsys)
    assert f"{weights}: not a readable safetensors file (" in err and "truncated or damaged" in err
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_names_the_file(tmp_path, capsys):
    file = _write_gguf(tmp_path / "m.gguf")
    file.write_bytes(file.read_bytes()[:200])
    err = _fail([file, "--out", tmp_path / "out"], capsys)
    assert f"{file}: not a readable GGUF file (" in err and "truncated or damaged: download or copy it again" in err


def test_pickle_only_directory_is_one_line(tiny_llama_dir, tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    (model / "pytorch_model.bin").write_bytes(b"not a pickle")
    err = _fail([model, "--out", tmp_path / "out"], capsys)
    assert "holds only pickled weights (pytorch_model.bin); lidr_jax never unpickles" in err


def test_unsupported_architecture_is_one_line(tiny_llama_dir, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    err = _fail([model, "--out", tmp_path / "out"], capsys)
    assert f"{model / 'config.json'}: model_type='gemma' is not supported; supported: llama" in err


def test_directory_without_tokenizer_files(tiny_llama_dir, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    err = _fail([model, "--out", tmp_path / "out"], capsys)
    assert f"{model} has no tokenizer files (tokenizer.json, or tokenizer.model" in err
    assert "copy tokenizer.json and tokenizer_config.json from the model's original repository" in err
    assert "sentencepiece" not in err and "tiktoken" not in err


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"])
def test_non_utf8_file_is_named(tiny_llama_dir, tmp_path, capsys, name):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    (model / name).write_bytes(b'{"x": "caf\xe9"}')  # Latin-1, not UTF-8
    err = _fail([model, "--out", tmp_path / "out"], capsys)
    assert f"{model / name}: not UTF-8 text (byte 10: invalid continuation byte)" in err


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused(tiny_llama_dir, tmp_path, capsys, monkeypatch, name):
    model = _copy(tiny_llama_dir, tmp_path / "m")
    settings = json.loads((model / name).read_text())
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / name).write_text(json.dumps(settings))
    (model / "tokenization_evil.py").write_text("raise SystemExit('remote code ran')\n")
    err = _fail([model, "--out", tmp_path / "out"], capsys)
    assert f"{model / name} has auto_map (AutoTokenizer): this model needs Python code that ships with it" in err
    assert "lidr_jax never runs remote code (trust_remote_code is always False)" in err
    assert not (tmp_path / "out").exists()


def test_transformers_is_asked_never_to_run_remote_code(tiny_llama_dir, monkeypatch):
    from transformers import AutoTokenizer

    seen = []
    real = AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    load_pretrained(tiny_llama_dir)
    assert seen and all(kw.get("trust_remote_code") is False for kw in seen)


# -------------------------------------------------------------------------- permissions and card


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_follow_the_umask(tiny_model, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = export_hf(tiny_model, tmp_path / "hf", max_shard_size="60KB")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(modes) > 5 and set(modes.values()) == {0o666 & ~umask}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_model_card_of_a_plain_export(tiny_model, tmp_path):
    card = (export_hf(tiny_model, tmp_path / "hf", dtype="float32") / MODEL_CARD).read_text()
    assert card.startswith('---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- "lidr_jax"\n---\n')
    assert f"| Base model | `{'/'.join(Path(tiny_model.source).parts[-3:])}` |" in card  # no absolute path
    assert str(tmp_path.parent) not in card and str(Path(tiny_model.source).parent) not in card
    assert "| Method | not recorded (the export was given no card information) |" in card
    n = sum(int(p.size) for p in jax.tree.leaves(tiny_model.params))
    assert f"| Architecture | llama, 2 layers, hidden size 64, {n:,} parameters |" in card
    assert "| Weights | float32 safetensors |" in card and "Per-language" not in card
    with pytest.raises(ValueError, match=r"model card keys \['langs'\] are not known"):
        export_hf(tiny_model, tmp_path / "bad", card={"langs": ["en"]})
    assert not (tmp_path / "bad").exists()
    # The command converting a model directory says so.
    assert export_run.main([tiny_model.source, "--out", str(tmp_path / "cli")]) == 0
    card = (tmp_path / "cli" / MODEL_CARD).read_text()
    assert "| Method | none: a format conversion by lidr_jax, no training |" in card


def test_model_card_of_a_run_export(tiny_llama_dir, tmp_path, capsys):
    run = _run_with_policy(tmp_path, tiny_llama_dir)
    run.mark_done(
        1,
        "translate",
        {"stats": {"failed": {"en->fr": 3, "fr->en": 1, "en->ru": 0, "ru->en": 2}, "total": {"en->fr": 40}}},
    )
    pairs = {"pairs": 150, "pairs_per_language": {"en": 70, "fr": 42, "ru": 38}, "dropped": {}}
    pairs["table"] = {"fr": {"candidates": 45, "kept": 42, "dropped": {"identical": 2, "language": 1}}}
    run.mark_done(1, "pairs", {"stats": pairs})
    run.mark_done(1, "generate", {"stats": {"en": {"answers": 40, "mean_tokens": 120.5}, "ru": {"answers": 40}}})
    run.mark_done(
        1,
        "check",
        {
            "held_out": {"in_language": {"en": 1.0, "fr": 0.875, "ru": 0.75}, "mean_tokens": {"fr": 51.5}},
            "evaluation": {"mgsm_accuracy": {"fr": 0.125}},
        },
    )
    assert export_run.main([str(run.path), "--out", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / MODEL_CARD).read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "language": ["en", "fr", "ru"],
        "tags": ["lidr_jax", "dpo"],
    }
    assert f"| Base model | `{'/'.join(tiny_llama_dir.parts[-3:])}` |" in card and str(tmp_path) not in card
    assert "| Method | LIDR (Language Imbalance Driven Rewarding): iterative DPO" in card
    assert "| Iteration | 1 |" in card and "| Languages | en, fr, ru |" in card
    assert "| Training data | 150 preference pairs |" in card and f"| Run | `{run.path.name}` |" in card
    assert f"Exported by lidr_jax from the run `{run.path.name}`, iteration 1." in card
    table = card[card.index("## Per-language numbers of iteration 1") :].split("\n\n")[1].splitlines()
    assert table == [
        "| language | pairs | failed translations en->X | failed translations X->en | candidates | kept | dropped "
        "| generate answers | generate mean tokens | held-out in-language share | held-out mean tokens "
        "| mgsm_accuracy |",
        "|---" * 12 + "|",
        "| en | 70 | - | - | - | - | - | 40 | 120.5 | 1.000 | - | - |",  # one format per column
        "| fr | 42 | 3 | 1 | 45 | 42 | 3 | - | - | 0.875 | 51.5 | 0.125 |",
        "| ru | 38 | 0 | 2 | - | - | - | 40 | - | 0.750 | - | - |",
    ]
    # Iteration 0 is the starting model: no method, no training data.
    assert export_run.main([str(run.path), "--iteration", "0", "--out", str(tmp_path / "base")]) == 0
    base_card = (tmp_path / "base" / MODEL_CARD).read_text()
    assert "| Method | none: the run's starting model (iteration 0) |" in base_card
    assert "Training data" not in base_card and "| Iteration | 0 |" in base_card


def test_the_command_itself_refuses_quickly(tiny_llama_dir, tmp_path):
    """`python -m lidr_jax.export` as a user runs it: exit code 2, one line, the file kept, in seconds."""
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"someone's weights")
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "lidr_jax.export", str(tiny_llama_dir), "--out", str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert out.returncode == 2, out.stderr
    assert out.stderr == (
        f"error: export destination {target} is a file, not a folder; nothing was written: "
        "choose a folder that does not exist yet (or an empty one)\n"
    )
    assert target.read_bytes() == b"someone's weights"
    # Imports only (measured 2.2-2.6 s with `time python -m lidr_jax.export DIR --out FILE`).
    assert seconds < 30


def test_model_card_names_the_embedded_checkpoint_and_its_quantization():
    from lidr_jax.formats.export import held_out_card, model_card
    from lidr_jax.formats.load import embedded_model_path

    held = held_out_card(
        {
            "in_language": {"es": 0.875},
            "in_language_low": {"es": 0.625},
            "in_language_high": {"es": 1.0},
            "ref_loglik": {"es": -2.1316},
            "ref_loglik_low": {"es": -2.4},
            "ref_loglik_high": {"es": -1.9},
            "n": {"es": 8.0},
        }
    )
    card = model_card(
        {"base_model": "smollm2-135m-instruct", "iteration": 1, "held_out": held, "run": "/home/u/runs/default"},
        config=SimpleNamespace(model_type="llama", num_hidden_layers=30, hidden_size=576),
        source=f"smollm2-135m-instruct ({embedded_model_path('smollm2-135m-instruct')})",
        dtype="float32",
        num_params=134515008,
    )
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in card.split("---\n")[1]
    assert "| Base model | `HuggingFaceTB/SmolLM2-135M-Instruct` |" in card
    assert "| Base weights | GGUF Q4_1 (4-bit), dequantized to float32 by lidr_jax |" in card
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "/home/u" not in card and "site-packages" not in card
    assert "| Run | `default` |" in card
    assert "| language | prompts | in-language share | ref. log-lik / token |" in card
    assert "| es | 8 | 0.88 [0.62, 1.00] | -2.132 [-2.400, -1.900] |" in card
