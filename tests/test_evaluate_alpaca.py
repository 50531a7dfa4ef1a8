"""X-AlpacaEval outputs (alpaca_eval's model_outputs.json, field by field), EvalConfig checks, the
per-language table and the metric plots; all without a model (generation is replaced by a script)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import lidr_jax.sampling.sampler
from lidr_jax.eval.evaluate import (
    DECODING,
    EvalConfig,
    alpaca_records,
    default_generator,
    evaluate_model,
    format_table,
    head_to_head_dirs,
    read_x_alpacaeval,
)

ITEMS = {
    "en": [
        {"id": 1, "dataset": "helpful_base", "instruction": "What is the capital of France?"},
        {"id": 2, "dataset": "koala", "instruction": "Write a haiku about rain."},
        {"id": 3, "dataset": "oasst", "instruction": "Explain gravity."},
    ],
    "es": [
        {"id": 1, "dataset": "helpful_base", "instruction": "¿Cuál es la capital de Francia?"},
        {"id": 2, "dataset": "koala", "instruction": "Escribe un haiku sobre la lluvia."},
        {"id": 3, "dataset": "oasst", "instruction": "Explica la gravedad."},
    ],
}
ANSWERS = {
    "¿Cuál es la capital de Francia?": "La capital de Francia es París, una ciudad muy bonita.",
    "Escribe un haiku sobre la lluvia.": "The rain falls softly on the quiet roof tonight.",  # English: off-target
    "What is the capital of France?": "The capital of France is Paris, a beautiful city.",
    "Write a haiku about rain.": "Rain on the window, the garden drinks slowly, the evening is calm.",
}


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "x-alpacaeval"
    d.mkdir()
    for lang, rows in ITEMS.items():
        (d / f"{lang}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return d


@pytest.fixture
def scripted_generate(monkeypatch):
    """Replace the sampler: answer from ANSWERS by the last user message; record the sampling config."""
    calls = []

    def fake_generate(model, prompts, sampling):
        calls.append(dict(prompts=prompts, sampling=sampling))
        return [SimpleNamespace(text=ANSWERS[p[-1]["content"]], finish_reason="stop", token_ids=[]) for p in prompts]

    monkeypatch.setattr(lidr_jax.sampling.sampler, "generate", fake_generate)
    return calls


def test_read_x_alpacaeval(data_dir, tmp_path):
    assert read_x_alpacaeval(data_dir / "es.json", limit=2) == ITEMS["es"][:2]
    bad = tmp_path / "bad.json"
    bad.write_text('{"instruction": "not a list"}')
    with pytest.raises(ValueError, match="expected a JSON list of objects with an 'instruction' field"):
        read_x_alpacaeval(bad)
    with pytest.raises(FileNotFoundError, match=r"point the data path at a folder of \{lang\}.json"):
        read_x_alpacaeval(tmp_path / "xx.json")


def test_alpaca_records_fields():
    rows = alpaca_records(ITEMS["es"][:2], ["uno", "dos"], "gen-1")
    assert rows == [
        {
            "instruction": "¿Cuál es la capital de Francia?",
            "output": "uno",
            "generator": "gen-1",
            "dataset": "helpful_base",
        },
        {"instruction": "Escribe un haiku sobre la lluvia.", "output": "dos", "generator": "gen-1", "dataset": "koala"},
    ]
    with pytest.raises(ValueError, match="2 instructions but 1 outputs"):
        alpaca_records(ITEMS["es"][:2], ["uno"], "g")


def test_evaluate_model_alpaca_outputs(data_dir, tmp_path, scripted_generate):
    cfg = EvalConfig(
        benchmarks=("alpaca",),
        alpaca_languages=("en", "es"),
        limit=2,
        alpaca_dir=str(data_dir),
        alpaca_decoding="lidr",
        progress=False,
        system_prompt="You are a helpful assistant.",
    )
    model = SimpleNamespace(source="/runs/x/iter_1/hf/")
    metrics = evaluate_model(model, cfg, tmp_path / "eval")
    assert metrics == {"alpaca_off_target": {"en": 0.0, "es": 0.5}, "alpaca_truncated": {"en": 0.0, "es": 0.0}}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics

    (call,) = scripted_generate  # one generate call for every language
    s = call["sampling"]
    assert (s.temperature, s.repetition_penalty, s.max_new_tokens, s.top_p) == (0.0, 1.1, 2048, 1.0)
    assert call["prompts"][0] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    for lang in ("en", "es"):
        rows = json.loads((tmp_path / "eval" / "alpaca" / lang / "model_outputs.json").read_text(encoding="utf-8"))
        assert len(rows) == 2
        for row, item in zip(rows, ITEMS[lang]):
            assert list(row) == ["instruction", "output", "generator", "dataset"]
            assert row["instruction"] == item["instruction"]
            assert row["output"] == ANSWERS[item["instruction"]]
            assert row["generator"] == "lidr_jax-x-iter_1-lidr"  # the run and its iteration
            assert row["dataset"] == item["dataset"]
    summary = json.loads((tmp_path / "eval" / "alpaca" / "summary.json").read_text())
    assert summary["decoding"] == "lidr" and summary["languages"]["es"]["off_target_rate"] == 0.5


def test_icr_decoding(data_dir, tmp_path, scripted_generate):
    cfg = EvalConfig(
        benchmarks=("alpaca",),
        alpaca_languages=("en",),
        limit=1,
        alpaca_dir=str(data_dir),
        alpaca_decoding="icr",
        generator="mine",
        progress=False,
    )
    evaluate_model(SimpleNamespace(source="m"), cfg, tmp_path / "e")
    s = scripted_generate[0]["sampling"]
    assert (s.temperature, s.top_p, s.repetition_penalty) == (0.6, 0.9, 1.0)
    rows = json.loads((tmp_path / "e" / "alpaca" / "en" / "model_outputs.json").read_text())
    assert rows[0]["generator"] == "mine"
    assert DECODING["icr"] == dict(temperature=0.6, top_p=0.9)


def test_eval_config_errors():
    with pytest.raises(ValueError, match=r"benchmarks\[0\] must be one of \['mgsm', 'alpaca'\], got 'gsm'"):
        EvalConfig(benchmarks=("gsm",))
    with pytest.raises(ValueError, match=r"alpaca_decoding must be one of \['lidr', 'icr', 'greedy'\], got 'beam'"):
        EvalConfig(alpaca_decoding="beam")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        EvalConfig(limit=0)
    with pytest.raises(ValueError, match="needs mgsm_few_shot_dir"):
        EvalConfig(mgsm_few_shot_k=2)
    assert EvalConfig(mgsm_languages="de").mgsm_languages == ("de",)
    with pytest.raises(ValueError, match="MGSM needs its data folder: set mgsm_dir"):
        evaluate_model(SimpleNamespace(source="m"), EvalConfig(benchmarks=("mgsm",)), "/tmp/never-written")


def test_default_generator():
    assert default_generator(SimpleNamespace(source="smollm2-135m-instruct (/x/y.gguf)"), "icr") == (
        "lidr_jax-smollm2-135m-instruct-icr"
    )
    for k in (1, 2):  # each iteration of a run gets its own name, whichever of its checkpoints is loaded
        for tail in ("export/hf", "train/policy"):
            source = f"/home/u/runs/default/iter_{k}/{tail}/"
            assert default_generator(SimpleNamespace(source=source), "lidr") == f"lidr_jax-default-iter_{k}-lidr"
    assert default_generator(SimpleNamespace(source="/models/my-hf-dir"), "lidr") == "lidr_jax-my-hf-dir-lidr"


def test_head_to_head_dirs_alignment(tmp_path):
    for name, instrs in (("a", ["x", "y"]), ("b", ["x", "z"])):
        path = tmp_path / name / "en" / "model_outputs.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(alpaca_records([{"instruction": i} for i in instrs], ["o", "o"], name)))
    with pytest.raises(ValueError, match="en: the two output files do not hold the same instructions"):
        head_to_head_dirs(tmp_path / "a", tmp_path / "b", ["en"], judge=None)
    with pytest.raises(FileNotFoundError, match="write it with `python -m lidr_jax.evaluate alpaca-outputs`"):
        head_to_head_dirs(tmp_path / "a", tmp_path / "b", ["fr"], judge=None)


def test_format_table():
    table = format_table({"accuracy": {"en": 0.5, "de": 0.25}, "off_target": {"en": 0.0}})
    assert table.splitlines() == [
        "lang    accuracy  off_target",
        "de          0.25           -",
        "en           0.5           0",
    ]


def test_plot_metrics(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plots' extra")
    from lidr_jax.eval.plots import plot_metrics

    history = [
        {"mgsm_accuracy": {"en": 0.1, "de": 0.0}, "mgsm_off_target": {"de": 0.5}},
        {"mgsm_accuracy": {"en": 0.2, "de": 0.1}, "mgsm_off_target": {"de": 0.2}, "alpaca_off_target": {"es": 0.1}},
    ]
    out = plot_metrics(history, tmp_path / "plots" / "eval.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="history is empty"):
        plot_metrics([], tmp_path / "x.png")
