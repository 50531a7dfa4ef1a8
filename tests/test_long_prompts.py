"""Prompts are never cut (issue 26): with the paper config's translate settings and a model whose
context holds it, a 3,000-token answer reaches the translator whole; an answer longer than the
context is skipped by the stage, counted as `prompt_cut` in the pair table, and never trained on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lidr_jax.methods import lidr
from lidr_jax.methods.filters import DROP_REASONS, PairFilterConfig
from lidr_jax.methods.icr import icr_pairs
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.pipeline.config import load_run_config
from lidr_jax.pipeline.resumable import Job, generate_resumable
from lidr_jax.pipeline.run_dir import RunDir
from lidr_jax.sampling.sampler import prompt_limit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONTEXT = 8192  # Llama-3-8B's


def _text_of(tokenizer, n: int) -> str:
    """A text of exactly `n` tokens."""
    text = tokenizer.decode(tokenizer.encode(" ".join(f"w{i % 97}" for i in range(4 * n)))[:n])
    assert len(tokenizer.encode(text)) == n
    return text


def test_paper_configs_cut_nothing_that_fits_the_context():
    """The resolved stage settings of both paper configs: no explicit prompt limit, so every stage's
    limit is the context after its answer budget; the LIDR translation prompt of a 3,000-token answer
    fits with room to spare."""
    lidr_cfg = load_run_config(CONFIGS / "lidr_llama3_8b.yaml")
    icr_cfg = load_run_config(CONFIGS / "icr_llama3_8b.yaml")
    limits = {}
    for name, cfg, stages in (
        ("lidr", lidr_cfg, ("generate", "translate", "check")),
        ("icr", icr_cfg, ("sample", "translate_answers", "check")),
    ):
        for stage in stages:
            s = cfg.sampling(stage, 1)
            assert s.max_prompt_tokens is None, (name, stage)
            limits[name, stage] = prompt_limit(s, CONTEXT)
    assert limits["lidr", "generate"] == CONTEXT - 2400
    assert limits["lidr", "translate"] == CONTEXT - 4096
    assert limits["icr", "sample"] == CONTEXT - 2400
    assert limits["icr", "translate_answers"] == CONTEXT - 1  # 8,192 new tokens: the budget fills the context


def test_a_3000_token_answer_reaches_the_translator_whole(make_hf_model, tmp_path):
    """The LIDR translate stage's path (generate_resumable) with the paper config's translate settings on a
    tiny model with Llama-3's context: the 3,000-token answer's translation prompt is generated whole
    (prompt_tokens = its full length); a 9,000-token answer is over the context: skipped
    ("prompt_too_long"), and its pair counted as prompt_cut, not built."""
    from lidr_jax.formats.load import load_pretrained

    model = load_pretrained(make_hf_model("llama", max_position_embeddings=CONTEXT))
    tok = model.tokenizer
    cfg = load_run_config(CONFIGS / "lidr_llama3_8b.yaml")
    paper = cfg.sampling("translate", 1)
    prompt = cfg.lidr.prompts.translation
    texts = {"long": _text_of(tok, 3000), "over": _text_of(tok, 9000)}
    jobs = []
    for pid, text in texts.items():
        messages, prefill = lidr.translation_request(text, "fr", prompt)
        jobs.append(Job(f"en->fr/{pid}", messages, prefill or None, {"id": pid, "source": "en", "target": "fr"}))
    full = {j.meta["id"]: len(tok.prompt_ids(j.prompt, prefill=j.prefill)) for j in jobs}
    assert 3000 < full["long"] <= prompt_limit(paper, CONTEXT) < CONTEXT < full["over"]
    # Only the answer budget is shortened, to keep the test fast; the prompt limit stays the paper's.
    sampling = dataclasses.replace(
        paper, max_new_tokens=2, max_prompt_tokens=prompt_limit(paper, CONTEXT), progress=False
    )
    run = RunDir(tmp_path / "run", config={}, seed=0)
    rows = generate_resumable(run, model, jobs, sampling, tmp_path / "raw.jsonl", "translate")
    by_id = {r["id"]: r for r in rows}
    assert by_id["long"]["prompt_tokens"] == full["long"] and by_id["long"]["finish_reasons"] == ["length"]
    assert by_id["over"]["prompt_tokens"] == full["over"]
    assert (by_id["over"]["finish_reasons"], by_id["over"]["outputs"]) == (["prompt_too_long"], [""])
    # The pair stage: the answer over the context is counted, and no pair of it is built.
    translations = [
        {"id": r["id"], "source": "en", "target": "fr", "translation": None, "finish_reason": r["finish_reasons"][0]}
        for r in rows
    ]
    cut = lidr.prompt_cut_ids([], translations, ["fr"])
    assert cut == {"fr": {"over"}}
    ids = ("over",)
    prompts = PromptSet(("en", "fr"), ids, {"en": ("x",), "fr": ("x_fr",)})
    pairs, stats = lidr.build_pairs(
        prompts,
        {"en": {"over": texts["over"]}, "fr": {"over": "y"}},
        {"fr": {"over": None}},
        {"fr": {"over": "back"}},
        filters=PairFilterConfig(language=False),
        prompt_cut=cut,
    )
    assert pairs == [] and stats.table["fr"]["dropped"] == {**dict.fromkeys(DROP_REASONS, 0), "prompt_cut": 1}


def test_prompt_cut_ids_and_icr_prompt_cut():
    gens = [
        {"lang": "en", "id": "a", "finish_reasons": ["prompt_too_long"]},
        {"lang": "de", "id": "b", "finish_reasons": ["prompt_too_long"]},
        {"lang": "fr", "id": "c", "finish_reasons": ["stop"]},
    ]
    trans = [
        {"id": "c", "source": "fr", "target": "en", "finish_reason": "prompt_too_long"},
        {"id": "d", "source": "en", "target": "de", "finish_reason": "length"},
    ]
    # an English prompt over the limit feeds every X's pairs; an X answer and its translations feed X's
    assert lidr.prompt_cut_ids(gens, trans, ["fr", "de"]) == {"fr": {"a", "c"}, "de": {"a", "b"}}
    answers = {"p": ["one", "two"], "q": ["", ""]}
    rewards = {"p": [1.0, 0.0], "q": [float("nan")] * 2}
    no_lang = PairFilterConfig(language=False)
    pairs, _, stats = icr_pairs({"p": "x", "q": "y"}, "fr", answers, rewards, filters=no_lang, prompt_cut={"q"})
    assert [p.id for p in pairs] == ["p"] and stats["dropped"] == {"prompt_cut": 1} and stats["prompts"] == 2


def test_evaluation_counts_a_prompt_over_the_context(make_hf_model, tmp_path):
    """X-AlpacaEval generation: an instruction longer than the context after max_new_tokens gets an
    empty answer, counted per language (prompt_too_long), never cut; the other one is answered."""
    import json

    from lidr_jax.eval.evaluate import EvalConfig, run_alpaca_outputs
    from lidr_jax.formats.load import load_pretrained

    model = load_pretrained(make_hf_model("llama"))  # a 256-token context
    items = [{"instruction": "Dis bonjour."}, {"instruction": "Répète: " + "mot " * 400}]
    (tmp_path / "fr.json").write_text(json.dumps(items))
    cfg = EvalConfig(
        benchmarks=("alpaca",),
        alpaca_languages=("fr",),
        alpaca_dir=str(tmp_path),
        alpaca_max_new_tokens=4,
        batch_size=2,
        progress=False,
    )
    summary = run_alpaca_outputs(model, cfg, tmp_path / "out")
    assert summary["fr"]["prompt_too_long"] == 1 and summary["fr"]["n"] == 2
    rows = json.loads((tmp_path / "out" / "fr" / "model_outputs.json").read_text())
    assert rows[1]["output"] == "" and rows[0]["instruction"] == "Dis bonjour."
