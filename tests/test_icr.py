"""ICR: scoring prompts, the length-controlled α search against hand-computed answers, pairs, and
the implicit reward of a tiny random model equal to a log-prob difference computed by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from lidr_jax.methods.icr import (
    ICRSettings,
    icr_pairs,
    icr_scoring_prompt,
    implicit_rewards,
    language_prefix,
    score_answers,
    scoring_inputs,
    select_pairs,
    truncate_inputs,
)

# Hand-worked example (scores s = r - α·len):
# prompt 0: s = 3-300α, 1-100α, -50α. argmax: 0 for α<0.01, 1 for 0.01<α<0.02, then 2;
#           argmin: 2 for α<0.012, then 0. gap(c-r): 250 | 50 (0.01..0.012) | -200 | -250.
# prompt 1: s = 2-100α, 1.5-40α, 0.5-200α. argmax: 0 for α<1/120, then 1; argmin: always 2.
#           gap: -100 | -160.
# mean gap: 75 (α<1/120), 45 (1/120<α<0.01), -55, -180, -205 -> best |45| at the first grid α
# above 1/120 = 0.00833: 0.009.
R = [[3.0, 1.0, 0.0], [2.0, 1.5, 0.5]]
L = [[300, 100, 50], [100, 40, 200]]


def test_alpha_search_hand_computed():
    sel = select_pairs(R, L)
    assert sel.alpha == pytest.approx(0.009, abs=1e-12)
    assert sel.chosen_P.tolist() == [0, 1] and sel.rejected_P.tolist() == [2, 2]
    assert sel.keep_P.tolist() == [True, True]
    assert sel.length_gap == pytest.approx(45.0, abs=1e-9)
    assert len(sel.alphas_A) == 1000 and sel.alphas_A[1] == 0.001 and sel.alphas_A[-1] == 0.999
    assert sel.gap_A[0] == pytest.approx(75.0) and sel.gap_A[-1] == pytest.approx(-205.0)
    # alpha = 0 only: plain argmax/argmin of the reward
    sel0 = select_pairs(R, L, alpha_grid=[0.0])
    assert (sel0.chosen_P.tolist(), sel0.rejected_P.tolist(), sel0.length_gap) == ([0, 0], [2, 2], 75.0)


def test_upper_bound_excludes_high_rewards_from_chosen_only():
    # r=3 (prompt 0, answer 0) may not be chosen: prompt 0 picks 1 (α<0.02); rejected unchanged.
    # gap: prompt 0 50 (α<0.012), prompt 1 -100 (α<1/120) -> mean -25 at α=0, the best |gap|.
    sel = select_pairs(R, L, upper_bound=2.5)
    assert sel.alpha == 0.0
    assert sel.chosen_P.tolist() == [1, 0] and sel.rejected_P.tolist() == [2, 2]
    assert sel.length_gap == pytest.approx(-25.0)
    # a bound below every reward of prompt 1 drops it; prompt 0 can only choose answer 2, which is
    # also its rejected one at α=0.005 (no pair there) but not at α=0.02 (rejected 0).
    sel = select_pairs(R, L, alpha_grid=[0.005, 0.02], upper_bound=0.4)
    assert np.isinf(sel.gap_A[0]) and sel.gap_A[1] == pytest.approx(-250.0)
    assert sel.alpha == 0.02
    assert sel.chosen_P.tolist() == [2, -1] and sel.rejected_P.tolist() == [0, -1]
    assert sel.keep_P.tolist() == [True, False]


def test_ties_invalid_answers_and_blocking():
    # all scores equal -> no pair; NaN / invalid answers are never picked
    r = [[1.0, 1.0, 1.0], [np.nan, 2.0, 1.0], [5.0, 2.0, 1.0]]
    n = [[10, 10, 10], [10, 10, 10], [10, 10, 10]]
    valid = [[True, True, True], [True, True, True], [False, True, True]]
    sel = select_pairs(r, n, alpha_grid=[0.0], valid_PK=valid)
    assert sel.chosen_P.tolist() == [-1, 1, 1] and sel.rejected_P.tolist() == [-1, 2, 2]
    rng = np.random.default_rng(0)
    rr, ll = rng.normal(size=(37, 5)), rng.integers(1, 400, size=(37, 5))
    a, b = select_pairs(rr, ll), select_pairs(rr, ll, max_block_elems=100)
    assert (a.alpha, a.chosen_P.tolist(), a.rejected_P.tolist()) == (
        b.alpha,
        b.chosen_P.tolist(),
        b.rejected_P.tolist(),
    )
    # against a plain loop over alphas and prompts
    best = None
    for alpha in np.arange(1000) / 1000:
        s = rr - alpha * ll
        c, j = s.argmax(1), s.argmin(1)
        gap = np.mean(ll[np.arange(37), c] - ll[np.arange(37), j])
        if best is None or abs(gap) < abs(best[1]):
            best = (alpha, gap, c.tolist(), j.tolist())
    assert (a.alpha, a.chosen_P.tolist(), a.rejected_P.tolist()) == (best[0], best[2], best[3])
    assert a.length_gap == pytest.approx(best[1], abs=1e-9)
    with pytest.raises(ValueError, match=r"must both be \[prompts, answers\]"):
        select_pairs([1.0, 2.0], [1, 2])


def test_scoring_prompt_conditions():
    en = "List three colors."
    assert icr_scoring_prompt(en, "en") == [{"role": "user", "content": en}]
    fr = icr_scoring_prompt(en, "fr")
    assert fr == [{"role": "user", "content": language_prefix("fr") + "\n\n" + en}]
    assert "only in French" in fr[0]["content"] and "unless the instruction" in fr[0]["content"]
    assert icr_scoring_prompt(en, "fr", condition="translated", translated_instruction="Citez trois couleurs.") == [
        {"role": "user", "content": "Citez trois couleurs."}
    ]
    assert icr_scoring_prompt(en, "fr", condition="translate_answer") == [{"role": "user", "content": en}]
    assert icr_scoring_prompt(en, "de", system_prompt="S")[0] == {"role": "system", "content": "S"}
    with pytest.raises(ValueError, match="needs the fr instruction"):
        icr_scoring_prompt(en, "fr", condition="translated")
    with pytest.raises(ValueError, match="must be one of"):
        icr_scoring_prompt(en, "fr", condition="native")
    with pytest.raises(ValueError, match="unknown language code 'fra'"):
        icr_scoring_prompt(en, "fra")
    with pytest.raises(ValueError, match="condition must be one of"):
        ICRSettings(condition="x")
    assert implicit_rewards([1.0, -2.0], [0.5, -1.0]).tolist() == [0.5, -1.0]


def test_icr_pairs_from_answers():
    instructions = {"q0": "x0", "q1": "x1", "q2": "x2"}
    answers = {"q0": ["a" * 300, "b" * 100, "c" * 50], "q1": ["d" * 100, "e" * 40, "f" * 200], "q2": ["", "only"]}
    rewards = {"q0": R[0], "q1": R[1], "q2": [9.0, 1.0]}
    pairs, _sel, stats = icr_pairs(instructions, "fr", answers, rewards, ICRSettings(system_prompt="Sys"))
    assert stats == {"prompts": 3, "pairs": 2, "no_pair": 1, "alpha": 0.009, "length_gap": pytest.approx(45.0)}
    p0, p1 = pairs
    assert p0.prompt == [{"role": "system", "content": "Sys"}, {"role": "user", "content": "x0"}]
    assert (p0.chosen, p0.rejected, p0.chosen_from, p0.rejected_from) == ("a" * 300, "c" * 50, "sample:0", "sample:2")
    assert (p1.chosen, p1.rejected, p1.kind, p1.language, p1.id) == ("e" * 40, "f" * 200, "icr", "fr", "q1")
    assert p0.meta == {"reward_chosen": 3.0, "reward_rejected": 0.0, "alpha": 0.009}
    with pytest.raises(ValueError, match=r"no answers or rewards for 1 prompt id\(s\) \(q3\)"):
        icr_pairs({**instructions, "q3": "x3"}, "fr", answers, rewards)
    with pytest.raises(ValueError, match="2 answers but 1 rewards"):
        icr_pairs(instructions, "fr", answers, {**rewards, "q2": [1.0]})


def test_truncation_rule_of_scoring_inputs():
    rows = [([1, 2, 3, 4], [5, 6, 7]), ([1, 2], [5, 6, 7, 8, 9])]
    cut = truncate_inputs(rows, max_prompt_len=3, max_response_len=4)
    assert cut.prompt_ids == [[2, 3, 4], [1, 2]]  # a prompt keeps its end
    assert cut.response_ids == [[5, 6, 7], [5, 6, 7, 8]]  # a response keeps its start
    assert (cut.truncated_prompts, cut.truncated_responses) == (1, 1)


def test_reward_equals_logprob_difference_under_english_prompt():
    import jax
    from dpo_helpers import tiny_model

    from lidr_jax.model.llama import forward

    config, params_dpo, tok = tiny_model(seed=0)
    _, params_ref, _ = tiny_model(seed=1)
    english = "Name a color."
    items = [
        (icr_scoring_prompt(english, lang), ans)
        for lang, ans in [("en", "blue"), ("fr", "bleu"), ("de", "blau, wie der Himmel"), ("es", "azul")]
    ]
    # one batch (one compilation); rows are sorted by length inside, so order handling is tested too
    out = score_answers(params_dpo, params_ref, config, tok, items, batch_size=4, chunk=8)
    rows = scoring_inputs(tok, items)
    eot = tok.hf.convert_tokens_to_ids("<|im_end|>")
    for (messages, answer), (p, r) in zip(items, rows):
        assert p == tok.chat_ids(messages, add_generation_prompt=True)
        assert r[: len(answer)] == tok.encode(answer) and r[len(answer)] == eot  # end-of-turn is scored

    # By hand: one causal forward over right-padded rows (padding after a row cannot change its
    # log-probs), log-softmax in float64, summed over the response tokens.
    T = max(len(p) + len(r) for p, r in rows)
    tokens = np.zeros((len(rows), T), np.int32)
    for i, (p, r) in enumerate(rows):
        tokens[i, : len(p) + len(r)] = p + r
    fwd = jax.jit(lambda params, t: forward(params, t, config))

    def by_hand(params):
        logits = np.asarray(fwd(params, jnp.asarray(tokens))).astype(np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        return [
            sum(logp[i, t - 1, tokens[i, t]] for t in range(len(p), len(p) + len(r))) for i, (p, r) in enumerate(rows)
        ]

    want_dpo, want_ref = by_hand(params_dpo), by_hand(params_ref)
    for i in range(len(rows)):
        tol = 1e-5 * max(1.0, abs(want_dpo[i]), abs(want_ref[i]))  # float32 sums of ~20 log-probs
        assert abs(out["logp_dpo"][i] - want_dpo[i]) <= tol and abs(out["logp_ref"][i] - want_ref[i]) <= tol
        assert abs(out["reward"][i] - (want_dpo[i] - want_ref[i])) <= 2 * tol
    assert out["response_tokens"].tolist() == [len(r) for _, r in rows]
    assert out["truncated_prompts"] == 0 and out["truncated_responses"] == 0
