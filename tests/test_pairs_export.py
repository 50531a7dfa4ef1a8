"""Pair files for other trainers: LLaMA-Factory's alpaca ranking format read the way its converter reads
it, and `python -m lidr_jax.pairs convert` both ways."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lidr_jax.train.pairs import PreferencePair, main, read_pairs, write_llamafactory

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "Answer in the user's language."}
PAIRS = [
    PreferencePair(
        [{"role": "user", "content": "¿Qué es un gato?"}],
        [{"role": "assistant", "content": "Un gato es un animal."}],
        [{"role": "assistant", "content": "A cat is an animal."}],
        {"id": "p1", "language": "es", "kind": "target"},
    ),
    PreferencePair(
        [
            SYSTEM,
            {"role": "user", "content": "un"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "deux"},
        ],
        "two",
        "zwei",
        {"id": "p2", "language": "fr", "kind": "target"},
    ),
    PreferencePair("Say yes.", "yes", "no", {"id": "p3", "language": "en", "kind": "dominant"}),
]


def llamafactory_view(dataset_dir: Path, name: str) -> list[dict]:
    """What LLaMA-Factory's alpaca converter makes of a ranking dataset, in its own terms: it looks the
    dataset up in dataset_info.json, loads file_name with `datasets` (json builder), and per row builds
    the prompt from history pairs then one user turn `prompt\\nquery` (empty parts skipped); a row is a
    preference pair only when the chosen and rejected columns hold strings; system is the column's value."""
    datasets = pytest.importorskip("datasets")
    entry = json.loads((dataset_dir / "dataset_info.json").read_text())[name]
    assert entry["ranking"] is True and entry.get("formatting", "alpaca") == "alpaca"
    cols = {"prompt": "instruction", "query": "input", **entry.get("columns", {})}
    data = str(dataset_dir / entry["file_name"])
    rows = datasets.load_dataset("json", data_files=data, split="train", cache_dir=str(dataset_dir / ".hf_cache"))
    out = []
    for ex in rows:
        prompt = []
        if cols.get("history") and isinstance(ex[cols["history"]], list):
            for user, assistant in ex[cols["history"]]:
                prompt += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        query = [ex[cols[k]] for k in ("prompt", "query") if ex[cols[k]]]
        prompt.append({"role": "user", "content": "\n".join(query)})
        assert isinstance(ex[cols["chosen"]], str) and isinstance(ex[cols["rejected"]], str), ex
        system = ex[cols["system"]] if cols.get("system") else ""
        assert isinstance(system, str)
        out.append(dict(prompt=prompt, chosen=ex[cols["chosen"]], rejected=ex[cols["rejected"]], system=system))
    return out


def test_llamafactory_reads_every_pair_as_a_string_pair(tmp_path):
    written = write_llamafactory(PAIRS, tmp_path / "pairs.jsonl", "lidr_jax_iter1")
    assert written["dataset_info"] == tmp_path / "dataset_info.json"
    view = llamafactory_view(tmp_path, "lidr_jax_iter1")
    assert [v["chosen"] for v in view] == ["Un gato es un animal.", "two", "yes"]
    assert [v["rejected"] for v in view] == ["A cat is an animal.", "zwei", "no"]
    assert view[0] == dict(
        prompt=[{"role": "user", "content": "¿Qué es un gato?"}],
        chosen="Un gato es un animal.",
        rejected="A cat is an animal.",
        system="",
    )
    assert view[1]["prompt"] == [
        {"role": "user", "content": "un"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "deux"},
    ]
    assert view[1]["system"] == SYSTEM["content"]
    # and our own reader gets the pairs back, provenance included
    back = read_pairs(tmp_path / "pairs.jsonl")
    assert back[1].prompt == PAIRS[1].prompt and back[2].extra == PAIRS[2].extra


def test_dataset_info_keeps_other_entries(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    write_llamafactory(PAIRS[2:], tmp_path / "p.jsonl", "ours")
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["mine"] == {"file_name": "mine.json"}
    assert info["ours"] == {
        "file_name": "p.jsonl",
        "formatting": "alpaca",
        "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
    }


def test_convert_trl_to_llamafactory_and_back(tmp_path, capsys):
    src = tmp_path / "trl.jsonl"
    src.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, **p.extra}) + "\n"
            for p in PAIRS
        )
    )
    assert main(["convert", str(src), "--to", "llamafactory", str(tmp_path / "lf" / "ours.jsonl")]) == 0
    assert "dataset_info: " in capsys.readouterr().out
    assert len(llamafactory_view(tmp_path / "lf", "ours")) == 3
    assert main(["convert", str(tmp_path / "lf" / "ours.jsonl"), "--to", "trl", str(tmp_path / "back.jsonl")]) == 0
    back = [json.loads(x) for x in (tmp_path / "back.jsonl").read_text().splitlines()]
    assert back[2] == {
        "prompt": "Say yes.",
        "chosen": "yes",
        "rejected": "no",
        "id": "p3",
        "language": "en",
        "kind": "dominant",
    }
    assert read_pairs(tmp_path / "back.jsonl")[1].prompt == PAIRS[1].prompt


def test_convert_refuses_a_pair_llamafactory_cannot_hold(tmp_path, capsys):
    src = tmp_path / "multi.jsonl"
    two_turns = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    src.write_text(json.dumps({"prompt": "x", "chosen": two_turns, "rejected": "z"}) + "\n")
    assert main(["convert", str(src), "--to", "llamafactory", str(tmp_path / "o.jsonl")]) == 2
    assert "single assistant answer; this chosen has 2 messages" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_entry_module_help():
    out = subprocess.run(
        [sys.executable, "-m", "lidr_jax.pairs", "convert", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--to {trl,llamafactory}" in out.stdout


def test_every_pairs_stage_writes_llamafactory_files(tmp_path):
    """The pipeline's pair writer (both strategies) leaves iter_K/pairs/llamafactory/ beside the TRL file."""
    from lidr_jax.methods.lidr import Pair
    from lidr_jax.pipeline.pair_output import write_pairs
    from lidr_jax.pipeline.run_dir import RunDir

    run = RunDir(tmp_path / "run", config={"x": 1}, seed=0)
    d = run.stage_dir(2, "pairs")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "¿Qué es el sol?"}]
    pairs = [
        Pair(prompt, "Una estrella.", "A star.", "p1", "es", "target", "translation:en->es", "generation:es"),
        Pair(prompt[1:], "Luz.", "Light.", "p2", "es", "target", "translation:en->es", "generation:es"),
    ]
    out = write_pairs(run, d, pairs, {})
    assert out["llamafactory"] == str(d / "llamafactory" / "dataset_info.json")
    view = llamafactory_view(d / "llamafactory", "lidr_jax_iter_2")
    assert [(v["chosen"], v["rejected"], v["system"]) for v in view] == [
        ("Una estrella.", "A star.", "Be brief."),
        ("Luz.", "Light.", ""),
    ]
    assert view[0]["prompt"] == [{"role": "user", "content": "¿Qué es el sol?"}]
