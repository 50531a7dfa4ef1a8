"""The LIDR authors' evaluation preset: MGSM decoded greedily with repetition penalty 1.1, up to 2,048
tokens, under the generation system prompt (configs/lidr_llama3_8b.yaml)."""

from pathlib import Path

import pytest

from lidr_jax.eval.evaluate import EvalConfig, run_mgsm
from lidr_jax.pipeline.config import load_run_config


class Result:
    def __init__(self, text, finish_reason="stop"):
        self.text, self.finish_reason = text, finish_reason


def test_mgsm_lidr_preset_decoding_and_system_prompt(tmp_path):
    (tmp_path / "mgsm_en.tsv").write_text("Half of 10?\t5\n")
    seen = {}

    def fake_generate(model, chats, sampling):
        seen["chats"], seen["sampling"] = chats, sampling
        return [Result("The answer is 5.") for _ in chats]

    cfg = EvalConfig(
        benchmarks=("mgsm",),
        mgsm_dir=str(tmp_path),
        mgsm_languages=("en",),
        mgsm_decoding="lidr",
        mgsm_max_new_tokens=2048,
        system_prompt="Be helpful.",
        progress=False,
    )
    out = run_mgsm(None, cfg, generate_fn=fake_generate)
    s = seen["sampling"]
    assert (s.temperature, s.repetition_penalty, s.max_new_tokens) == (0.0, 1.1, 2048)
    assert seen["chats"][0][0] == {"role": "system", "content": "Be helpful."}
    assert out["en"]["accuracy"] == 1.0
    # the default stays plain greedy
    run_mgsm(
        None, EvalConfig(mgsm_dir=str(tmp_path), mgsm_languages=("en",), progress=False), generate_fn=fake_generate
    )
    assert (seen["sampling"].temperature, seen["sampling"].repetition_penalty) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"mgsm_decoding must be one of \['lidr', 'icr', 'greedy'\], got 'beam'"):
        EvalConfig(mgsm_decoding="beam")


def test_lidr_paper_config_sets_the_preset():
    ev = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "lidr_llama3_8b.yaml").evaluation
    assert (ev.alpaca_decoding, ev.alpaca_max_new_tokens, ev.mgsm_decoding, ev.mgsm_max_new_tokens) == (
        "lidr",
        2048,
        "lidr",
        2048,
    )


def test_mgsm_counts_a_question_too_long_for_the_context(tmp_path):
    """A problem whose prompt does not fit is not answered (never cut): scored wrong, kept in n, counted."""
    (tmp_path / "mgsm_en.tsv").write_text("Half of 10?\t5\nA very long question?\t7\n")

    def fake_generate(model, chats, sampling):
        return [Result("The answer is 5."), Result("", "prompt_too_long")]

    cfg = EvalConfig(mgsm_dir=str(tmp_path), mgsm_languages=("en",), progress=False)
    out = run_mgsm(None, cfg, generate_fn=fake_generate)["en"]
    assert (out["n"], out["accuracy"], out["prompt_too_long"]) == (2, 0.5, 1)
    assert [r["prompt_too_long"] for r in out["records"]] == [False, True]
