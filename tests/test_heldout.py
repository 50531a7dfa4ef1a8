"""The held-out measurement: bootstrap intervals and in-language shares on scripted answers (exact
values for a fixed seed), the reference log-likelihood of a tiny random model checked by hand, and the
demonstration config (configs/demo.yaml) read by the run-config loader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_helpers import tiny_random_model

from lidr_jax.eval.heldout import (
    Estimate,
    bootstrap_mean,
    checkpoint_metrics,
    format_estimate,
    in_language,
    in_language_by_id,
    measure_table,
    paired_change,
    reference_logliks,
    summarize_language,
    summarize_rows,
)
from lidr_jax.methods.lidr import chat_prompt
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.model.llama import forward
from lidr_jax.pipeline.config import load_run_config
from lidr_jax.pipeline.runner import plan_prompts

# 48 prompts: 30 answered in the asked language before, 39 after (every earlier hit kept).
BEFORE = [1.0] * 30 + [0.0] * 18
AFTER = [1.0] * 39 + [0.0] * 9

SCRIPTED = {
    "es": [
        "Hoy hace muy buen tiempo y vamos a pasear por el parque.",
        "The weather is very nice today and we are going for a walk.",
        "La capital de Italia es Roma, una ciudad muy antigua.",
        "12",
    ],
    "en": [
        "The capital of Italy is Rome, a very old city.",
        "Drink water every day and sleep at least seven hours.",
        "Die Hauptstadt von Italien ist Rom.",
        "A triangle has three sides.",
    ],
}


def test_bootstrap_mean_exact_values_for_a_fixed_seed():
    est = bootstrap_mean(BEFORE, seed=0)
    assert est == Estimate(0.625, 0.5, 0.75, 48)
    assert bootstrap_mean(BEFORE, seed=0) == est  # same seed, same interval
    assert bootstrap_mean(BEFORE, seed=1) == Estimate(0.625, 0.4791666666666667, 0.7708333333333334, 48)
    assert bootstrap_mean(AFTER, seed=0, resamples=500, level=0.9) == Estimate(
        0.8125, 0.7083333333333334, 0.8958333333333334, 48
    )
    # no spread, no interval; no prompts, no number
    assert bootstrap_mean([1.0] * 10) == Estimate(1.0, 1.0, 1.0, 10)
    nan = bootstrap_mean([])
    assert nan.n == 0 and all(v != v for v in (nan.value, nan.low, nan.high))
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_mean(BEFORE, level=95)


def test_paired_change_is_the_interval_of_the_difference():
    change = paired_change(BEFORE, AFTER, seed=0)
    assert change == Estimate(0.1875, 0.08333333333333333, 0.3125, 48)
    # the unpaired intervals overlap although every prompt moved one way: pairing is what shows the effect
    assert bootstrap_mean(AFTER, seed=0).low < bootstrap_mean(BEFORE, seed=0).high and change.low > 0
    assert paired_change(BEFORE, BEFORE) == Estimate(0.0, 0.0, 0.0, 48)
    with pytest.raises(ValueError, match="aligned per prompt"):
        paired_change(BEFORE, AFTER[:-1])


def test_in_language_share_on_scripted_answers():
    assert in_language(SCRIPTED["es"], "es").tolist() == [True, False, True, False]  # "12" has no language
    assert in_language(SCRIPTED["en"], "en").tolist() == [True, True, False, True]
    s = summarize_language(SCRIPTED["es"], "es", tokens=[14, 13, 12, 1], logliks=[-1.0, -2.0, -1.5, -0.5], seed=0)
    assert s == {
        "in_language": {"value": 0.5, "low": 0.0, "high": 1.0, "n": 4},
        "mean_chars": 42.5,  # (56 + 59 + 53 + 2) / 4
        "mean_tokens": 10.0,
        "ref_loglik": {"value": -1.25, "low": -1.75, "high": -0.75, "n": 4},
    }
    assert format_estimate(s["in_language"]) == "0.50 [0.00, 1.00]" and format_estimate(bootstrap_mean([])) == "-"


def test_summarize_rows_skips_translation_tasks_and_reads_logliks():
    rows = [
        {"lang": lang, "id": f"p{i}", "outputs": [text], "tokens": [len(text) // 4]}
        for lang, texts in SCRIPTED.items()
        for i, text in enumerate(texts)
    ]
    logliks = {"en": {"p0": -0.5, "p1": -1.0, "p2": -2.0, "p3": -0.5}}
    out = summarize_rows(rows, skip_ids={"p3"}, logliks=logliks, seed=0, resamples=1000)
    assert set(out) == {"es", "en"}
    assert out["es"]["in_language"] == {"value": 2 / 3, "low": 0.0, "high": 1.0, "n": 3}
    assert out["es"]["mean_chars"] == (56 + 59 + 53) / 3
    assert out["en"]["in_language"]["value"] == 2 / 3 and out["en"]["mean_tokens"] == (11 + 13 + 8) / 3
    assert out["en"]["ref_loglik"] == {"value": -1.0, "low": -1.625, "high": -0.5, "n": 4}
    assert "ref_loglik" not in out["es"]
    assert in_language_by_id(rows, "es", skip_ids={"p3"}) == {"p0": 1.0, "p1": 0.0, "p2": 1.0}


def test_checkpoint_metrics_and_the_report_table():
    """Flat {metric: {lang: value}} for the run report; the change since the start is paired by prompt id."""
    held = PromptSet(
        ("es", "en"),
        ("p0", "p1", "p2", "p3"),
        dict.fromkeys(("es", "en"), ("a", "b", "c", "d")),
        translation_task=frozenset({"p3"}),  # left out of the answer measures
    )
    after = [
        {"lang": lang, "id": f"p{i}", "outputs": [text], "tokens": [len(text) // 4]}
        for lang, texts in SCRIPTED.items()
        for i, text in enumerate(texts)
    ]
    start = [dict(r, outputs=["12"]) if r["lang"] == "es" else r for r in after]  # no Spanish answer at the start
    logliks = {"en": {"p0": -0.5, "p1": -1.0, "p2": -2.0, "p3": -0.5}}
    m0 = checkpoint_metrics(start, held, seed=0, resamples=1000)
    m1 = checkpoint_metrics(after, held, logliks=logliks, start_rows=start, seed=0, resamples=1000)
    assert m0 == {
        "in_language": {"es": 0.0, "en": 2 / 3},
        "in_language_low": {"es": 0.0, "en": 0.0},
        "in_language_high": {"es": 0.0, "en": 1.0},
        "n": {"es": 3.0, "en": 3.0},
        "mean_tokens": {"es": 41 / 3, "en": 32 / 3},
        "mean_chars": {"es": 2.0, "en": 134 / 3},
    }
    assert m1["change"] == {"es": 2 / 3, "en": 0.0} and m1["change_low"] == {"es": 0.0, "en": 0.0}
    assert m1["change_high"] == {"es": 1.0, "en": 0.0}
    assert (m1["ref_loglik"], m1["ref_loglik_low"], m1["ref_loglik_high"]) == (
        {"en": -1.0},
        {"en": -1.625},
        {"en": -0.5},
    )
    assert measure_table([m0, m1], ["es", "en"]) == [
        ["lang", "measure", "k=0", "k=1"],
        ["es", "in-language share", "0.00 [0.00, 0.00]", "0.67 [0.00, 1.00]"],
        ["es", "change since k=0", "-", "+0.67 [+0.00, +1.00]"],
        ["es", "ref. log-lik / token", "-", "-"],
        ["es", "mean answer tokens", "13.7", "13.7"],
        ["en", "in-language share", "0.67 [0.00, 1.00]", "0.67 [0.00, 1.00]"],
        ["en", "change since k=0", "-", "+0.00 [+0.00, +0.00]"],
        ["en", "ref. log-lik / token", "-", "-1.000 [-1.625, -0.500]"],
        ["en", "mean answer tokens", "10.7", "10.7"],
    ]
    prefixed = [{f"held_out/{k}": v for k, v in m.items()} for m in (m0, m1)]
    assert measure_table(prefixed, ["es", "en"], prefix="held_out/") == measure_table([m0, m1], ["es", "en"])


def test_reference_logliks_equal_a_forward_pass_by_hand():
    model = tiny_random_model(seed=0, max_len=256)
    prompts = PromptSet(
        ("en", "fr"),
        ("a", "b", "c"),
        {
            "en": ("Name a colour.", "How many days are in a week?", "Say hi."),
            "fr": ("Une couleur ?", "Jours ?", "Salut."),
        },
        references={"en": {"a": "Blue.", "b": "Seven days."}, "fr": {"c": "Bonjour !"}},
    )
    got = reference_logliks(model, prompts, batch_size=4)
    assert list(got) == ["en", "fr"] and list(got["en"]) == ["a", "b"] and list(got["fr"]) == ["c"]
    tok = model.tokenizer
    eot = tok.hf.convert_tokens_to_ids("<|im_end|>")
    fwd = jax.jit(lambda params, t: forward(params, t, model.config))
    for lang, pid, instruction, answer in [
        ("en", "a", "Name a colour.", "Blue."),
        ("en", "b", "How many days are in a week?", "Seven days."),
        ("fr", "c", "Salut.", "Bonjour !"),
    ]:
        prompt = tok.chat_ids(chat_prompt(instruction), add_generation_prompt=True)
        # one id per character, then the template's end of turn "<|im_end|>\n", scored as in DPO training
        answer_ids = tok.encode(answer) + [eot] + tok.encode("\n")
        tokens = np.asarray([list(prompt) + answer_ids], np.int32)
        logits = np.asarray(fwd(model.params, jnp.asarray(tokens))).astype(np.float64)[0]
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        want = np.mean([logp[t - 1, tokens[0, t]] for t in range(len(prompt), tokens.shape[1])])
        assert abs(got[lang][pid] - want) <= 1e-5 * max(1.0, abs(want))


# ---------------------------------------------------------------- the demonstration config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_demo_config_parses_and_plans_fresh_prompts_and_the_whole_heldout_split():
    cfg = load_run_config(DEMO)
    assert (cfg.reward, cfg.iterations, cfg.languages) == ("lidr", 2, ("en", "es", "de", "fr", "ru"))
    assert cfg.prompts.check_split == "heldout" and cfg.export_dtype == "float32"
    slices, held = plan_prompts(cfg)
    assert [s.ids for s in slices] == [tuple(f"p{i:03d}" for i in r) for r in (range(32), range(32, 64))]
    assert held.ids == tuple(f"p{i:03d}" for i in range(168, 216)) and held.languages == cfg.languages
    assert all(len(held.references[lang]) == 48 for lang in cfg.languages)  # the likelihood signal's answers
    # the second command: ICR from the LIDR policy, pi_DPO = the run's model (iteration 2), pi_ref = iteration 1
    icr = load_run_config(
        DEMO,
        ["reward=icr", "iterations=1", "plan.offset=64", "model=runs/demo/iter_2/export/hf"],
        run_dir="runs/demo_icr",
    )
    assert (icr.reward, icr.iterations, icr.model, icr.run_dir) == (
        "icr",
        1,
        "runs/demo/iter_2/export/hf",
        "runs/demo_icr",
    )
    assert (icr.icr.scorer, icr.icr.dpo_model, icr.icr.reference_model) == (
        "given",
        None,
        "runs/demo/iter_1/export/hf",
    )
    icr_slices, icr_held = plan_prompts(icr)
    assert icr_held.ids == held.ids  # the same held-out prompts in both runs, whatever the seed
    assert icr_slices[0].ids == tuple(f"p{i:03d}" for i in range(64, 96))  # fresh: after LIDR's 64
    # while choosing settings the check answers the dev split instead
    _, dev = plan_prompts(load_run_config(DEMO, ["prompts.check_split=dev", "plan.held_out=36"]))
    assert dev.ids == tuple(f"p{i:03d}" for i in range(132, 168))


def test_demo_config_first_stages_run_on_a_tiny_model(make_hf_model, tmp_path):
    """The demo config as written (only the model, the run directory and the token limits changed):
    the starting model answers all 48 held-out prompts in every language, then the first chunk of
    LIDR's generation runs on the first training prompts; the process is stopped there (the
    pipeline's fault injection), since the whole run is measured, not tested."""
    model_dir = make_hf_model("llama", max_position_embeddings=1024)
    run_dir = tmp_path / "demo"
    sets = [
        f"model={model_dir}",
        "generation.max_new_tokens=2",
        "generation.progress=false",
        "check.sampling.max_new_tokens=2",
    ]
    args = ["--config", str(DEMO), "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=str(DEMO.parents[1]), JAX_PLATFORMS="cpu", LIDR_JAX_CRASH_AT="generate:1")
    res = subprocess.run(
        [sys.executable, "-m", "lidr_jax.iterate", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == -9, res.stderr[-3000:]  # killed at the fault-injection point, nothing failed
    check = [json.loads(line) for line in (run_dir / "iter_0" / "check" / "held_out.jsonl").read_text().splitlines()]
    assert len(check) == 48 * 5 and {r["lang"] for r in check} == {"en", "es", "de", "fr", "ru"}
    assert {r["id"] for r in check} == {f"p{i:03d}" for i in range(168, 216)}
    partial = run_dir / "iter_1" / "generate" / "generations.partial.jsonl"
    chunks = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    ids = {row["id"] for chunk in chunks for row in chunk["rows"]}
    assert ids and ids <= {f"p{i:03d}" for i in range(32)}
