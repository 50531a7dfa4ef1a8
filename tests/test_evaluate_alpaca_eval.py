"""alpaca_eval against references in each language: the reference rows written beside every
model_outputs.json join it on the instruction (for every language of ../shared/data/x-alpacaeval), the
annotator config resolves the way alpaca_eval resolves it, and a head-to-head of two output folders."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import lidr_jax.sampling.sampler
from lidr_jax.eval.alpaca import aligned_references, annotator_config
from lidr_jax.eval.evaluate import EvalConfig, alpaca_records, main, run_alpaca_outputs

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "x-alpacaeval"


@pytest.fixture
def echo_generate(monkeypatch):
    """The sampler replaced by an echo of the instruction (no model); records each call."""
    calls = []

    def fake(model, prompts, sampling):
        calls.append(len(prompts))
        return [SimpleNamespace(text=p[-1]["content"], finish_reason="stop", token_ids=[]) for p in prompts]

    monkeypatch.setattr(lidr_jax.sampling.sampler, "generate", fake)
    return calls


def test_every_shared_language_joins_its_reference(tmp_path, echo_generate):
    pd = pytest.importorskip("pandas", reason="pandas checks the join as alpaca_eval does (a DataFrame merge)")
    if not SHARED.is_dir():
        pytest.skip("../shared/data/x-alpacaeval is absent (shared data is only beside the repository checkout)")
    langs = tuple(sorted(p.stem for p in SHARED.glob("*.json")))
    assert {"en", "es", "de", "fr", "ru"} <= set(langs)
    cfg = EvalConfig(
        benchmarks=("alpaca",),
        alpaca_languages=langs,
        limit=None,
        alpaca_dir=str(SHARED),
        alpaca_reference=str(SHARED / "reference"),
        progress=False,
    )
    summary = run_alpaca_outputs(SimpleNamespace(source="m"), cfg, tmp_path)
    for lang in langs:
        d = tmp_path / lang
        outputs = pd.read_json(d / "model_outputs.json")
        written = pd.read_json(d / "reference_outputs.json")
        original = pd.read_json(SHARED / "reference" / lang / "model_outputs.json")
        assert len(outputs) == len(json.loads((SHARED / f"{lang}.json").read_text(encoding="utf-8"))) == 805
        for reference in (written, original):
            joined = outputs.merge(reference, on="instruction", how="inner", suffixes=("", "_ref"), validate="1:1")
            assert len(joined) == len(outputs), lang  # every output row has its reference row
        assert list(written["instruction"]) == list(outputs["instruction"])  # same rows, same order
        assert set(written["generator"]) == {"gpt-4-turbo-2024-04-09"}
        command = summary[lang]["alpaca_eval_command"]
        assert command == (d / "alpaca_eval_command.txt").read_text().strip()
        assert f"--reference_outputs {d.absolute() / 'reference_outputs.json'}" in command


def test_annotator_config_resolves_as_alpaca_eval_reads_it(tmp_path, echo_generate):
    data = tmp_path / "data"
    (data / "ref" / "es").mkdir(parents=True)
    items = [{"instruction": "¿Qué es un río?", "dataset": "koala"}, {"instruction": "Di hola.", "dataset": "oasst"}]
    (data / "es.json").write_text(json.dumps(items))
    refs = alpaca_records(items[::-1], ["Hola.", "Un río es agua que corre."], "gpt-4-turbo")
    (data / "ref" / "es" / "model_outputs.json").write_text(json.dumps(refs))
    cfg = EvalConfig(
        benchmarks=("alpaca",),
        alpaca_languages=("es",),
        alpaca_dir=str(data),
        alpaca_reference=str(data / "ref"),
        alpaca_judge="judge-x",
        alpaca_annotator="plain",
        progress=False,
    )
    summary = run_alpaca_outputs(SimpleNamespace(source="m"), cfg, tmp_path / "out")
    d = tmp_path / "out" / "es"
    assert [r["output"] for r in json.loads((d / "reference_outputs.json").read_text())] == [
        "Un río es agua que corre.",
        "Hola.",
    ]
    # alpaca_eval: a directory given as annotators_config means its configs.yaml; prompt paths are
    # relative to the folder above the annotator's folder.
    args = shlex.split(summary["es"]["alpaca_eval_command"])
    assert args[:2] == ["alpaca_eval", "evaluate"]
    assert args[-4:] == ["--fn_metric", "get_winrate", "--sort_by", "win_rate"]  # LC fits are for English only
    config_dir = Path(args[args.index("--annotators_config") + 1])
    assert config_dir.is_absolute()
    configs = yaml.safe_load((config_dir / "configs.yaml").read_text())
    ((name, conf),) = configs.items()
    assert name == "lidr_jax_judge_es" and conf["completions_kwargs"]["model_name"] == "judge-x"
    template = (config_dir / "configs.yaml").parents[1] / conf["prompt_template"]
    prompt = template.read_text().format(instruction="¿Qué es un río?", output_1="A river.", output_2="Un río.")
    assert "written in Spanish" in prompt and "## Output (b)\nUn río." in prompt
    assert prompt.startswith("<|im_start|>system\n") and prompt.rstrip().endswith("<|im_end|>")
    assert conf["fn_completion_parser"] == "regex_parser"
    match = conf["completion_parser_kwargs"]["outputs_to_match"]
    assert [k for k, rx in match.items() if re.search(rx, "Output (b)")] == [2]
    assert [k for k, rx in match.items() if re.search(rx, "Output (a)")] == [1]


def test_a_reference_in_another_language_is_refused(tmp_path):
    rows = [{"instruction": "¿Qué es un río?", "output": "x"}, {"instruction": "Di hola.", "output": "y"}]
    refs = [{"instruction": "What is a river?", "output": "z"}, {"instruction": "Di hola.", "output": "w"}]
    with pytest.raises(
        ValueError, match=r"es: 1 of 2 instructions have no reference row \(first: '¿Qué es un río\?'\)"
    ):
        aligned_references(rows, refs, "es")
    assert aligned_references(rows[1:], refs, "es") == [refs[1]]


def test_missing_reference_fails_before_generation(tmp_path, echo_generate):
    (tmp_path / "de.json").write_text(json.dumps([{"instruction": "Sag hallo."}]))
    cfg = EvalConfig(
        benchmarks=("alpaca",),
        alpaca_languages=("de",),
        alpaca_dir=str(tmp_path),
        alpaca_reference=str(tmp_path / "nowhere"),
        progress=False,
    )
    with pytest.raises(FileNotFoundError, match=r"de: reference outputs .*nowhere/de/model_outputs.json not found"):
        run_alpaca_outputs(SimpleNamespace(source="m"), cfg, tmp_path / "out")
    assert echo_generate == []


def test_head_to_head_of_two_output_folders(tmp_path, capsys):
    for name in ("a", "b"):
        for lang, instr in (("fr", "Dis bonjour."), ("ru", "Скажи привет.")):
            path = tmp_path / name / lang / "model_outputs.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(alpaca_records([{"instruction": instr}], [f"{name} says"], name)))
    assert (
        main(
            [
                "alpaca-judge-files",
                "--outputs",
                str(tmp_path / "a"),
                "--reference",
                str(tmp_path / "b"),
                "--langs",
                "fr,ru",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for lang in ("fr", "ru"):
        d = tmp_path / "a" / lang
        assert (d / "alpaca_eval_command.txt").read_text().strip() in out
        assert json.loads((d / "reference_outputs.json").read_text())[0]["generator"] == "b"
        assert (
            "written in " + {"fr": "French", "ru": "Russian"}[lang]
            in (d / f"lidr_jax_weighted_judge_{lang}" / "prompt.txt").read_text()
        )

    # Judge files written earlier are not replaced silently: refused before anything is written, then --force.
    args = ["alpaca-judge-files", "--outputs", str(tmp_path / "a"), "--reference", str(tmp_path / "a"), "--langs", "fr"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {tmp_path / 'a' / 'fr' / 'reference_outputs.json'} exists (judge files written earlier); "
        "pass --force to replace it and the judge files beside it\n"
    )
    assert json.loads((tmp_path / "a" / "fr" / "reference_outputs.json").read_text())[0]["generator"] == "b"
    assert main([*args, "--force"]) == 0
    assert json.loads((tmp_path / "a" / "fr" / "reference_outputs.json").read_text())[0]["generator"] == "a"


def test_annotator_config_is_yaml_for_every_paper_language():
    for lang in ("en", "es", "ru", "de", "fr", "zh", "sw", "bn"):
        for kind, name in (("plain", f"lidr_jax_judge_{lang}"), ("weighted", f"lidr_jax_weighted_judge_{lang}")):
            text, prompt = annotator_config(lang, "m", kind)
            assert yaml.safe_load(text)[name]["prompt_template"] == f"{name}/prompt.txt"
            assert prompt.count("{instruction}") == prompt.count("{output_1}") == prompt.count("{output_2}") == 1


def test_alpaca_outputs_command_end_to_end(tmp_path, monkeypatch, capsys):
    """The command line with a tiny random model: outputs, references, annotator and the printed command."""
    from eval_helpers import tiny_random_model

    from lidr_jax.eval import evaluate

    data = tmp_path / "data"
    (data / "ref" / "fr").mkdir(parents=True)
    items = [
        {"instruction": "Dis bonjour.", "dataset": "oasst"},
        {"instruction": "Compte jusqu'à 3.", "dataset": "koala"},
    ]
    (data / "fr.json").write_text(json.dumps(items))
    (data / "ref" / "fr" / "model_outputs.json").write_text(
        json.dumps(alpaca_records(items, ["Bonjour !", "1 2 3"], "ref"))
    )
    monkeypatch.setattr(evaluate, "_load", lambda path: tiny_random_model())
    monkeypatch.setattr(evaluate, "_check_model", lambda spec, flag: None)
    monkeypatch.setattr(evaluate, "_check_model_files", lambda spec, flag: None)
    argv = [
        "alpaca-outputs",
        "--model",
        "tiny",
        "--data",
        str(data),
        "--langs",
        "fr",
        "--reference",
        str(data / "ref"),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    d = (tmp_path / "out" / "fr").absolute()
    command = (d / "alpaca_eval_command.txt").read_text().strip()
    assert command in printed and command.startswith(f"alpaca_eval evaluate --model_outputs {d / 'model_outputs.json'}")
    outputs = json.loads((d / "model_outputs.json").read_text())
    refs = json.loads((d / "reference_outputs.json").read_text())
    assert [r["instruction"] for r in outputs] == [r["instruction"] for r in refs] == [i["instruction"] for i in items]
    assert [r["output"] for r in refs] == ["Bonjour !", "1 2 3"]
    assert outputs[0]["generator"] == "lidr_jax-tiny-random-0-lidr"
    # a reference folder without this language is refused before the model loads
    monkeypatch.setattr(evaluate, "_load", lambda path: pytest.fail("the model must not load"))
    argv[argv.index("--reference") + 1] = str(tmp_path)
    assert main(argv) == 2
    assert "fr: reference outputs" in capsys.readouterr().err
