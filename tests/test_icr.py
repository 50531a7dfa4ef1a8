"""ICR: scoring prompts, the length-controlled α search against hand-computed answers, pairs, and
the implicit reward of a tiny random model equal to a log-prob difference computed by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from lidr_jax.methods.filters import PairFilterConfig
from lidr_jax.methods.icr import (
    ICRSelectionConfig,
    icr_pairs,
    icr_scoring_prompt,
    implicit_rewards,
    language_prefix,
    select_pairs,
)
from lidr_jax.model.scoring import ScoringConfig, encode_answers, score_answers


def answer_logprobs(params, config, rows, scoring):
    return score_answers(params, config, rows, scoring)[0].astype(np.float64)


PAPER = PairFilterConfig(language=False, empty=False, identical=False)

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


def test_upper_bound_is_strict_on_the_adjusted_score_after_the_search():
    # The search ignores the bound: alpha is the unbounded 0.009 even though r = 3 > 2.5; at 0.009
    # the adjusted scores are [0.3, 0.1, -0.45] and [1.1, 1.14, -1.3], all below 2.5.
    sel = select_pairs(R, L, upper_bound=2.5)
    assert sel.alpha == pytest.approx(0.009, abs=1e-12)
    assert sel.chosen_P.tolist() == [0, 1] and sel.rejected_P.tolist() == [2, 2]
    # alpha 0.5 (exact in binary): s = [3-2, 1-1, 0-0.5] = [1, 0, -0.5] and [2-1, 1.5-0.5, 0.5-2] = [1, 1, -1.5].
    # Bound 1.0: an answer whose adjusted score EQUALS the bound is skipped. Prompt 0 chooses answer 1
    # (its raw r = 1.0 is at the bound too, but its adjusted score 0 is below); prompt 1 can only
    # choose answer 2, which is also its rejected one: no pair (not "bounded": one answer was choosable).
    sel = select_pairs(R, [[4, 2, 1], [2, 1, 4]], alpha_grid=[0.5], upper_bound=1.0)
    assert sel.chosen_P.tolist() == [1, -1] and sel.rejected_P.tolist() == [2, -1]
    assert sel.keep_P.tolist() == [True, False] and sel.bounded_P.tolist() == [False, False]
    assert sel.length_gap == pytest.approx(1.0)  # len 2 - len 1, over the kept prompt
    # a bound below every adjusted score leaves nothing to choose: "bounded"
    sel = select_pairs(R, [[4, 2, 1], [2, 1, 4]], alpha_grid=[0.5], upper_bound=-2.0)
    assert sel.keep_P.tolist() == [False, False] and sel.bounded_P.tolist() == [True, True]


def test_an_answer_that_may_not_be_chosen_can_still_be_rejected():
    # prompt 0: the best answer (0) fails a filter: chosen 1; prompt 1: nothing choosable: no pair
    sel = select_pairs(R, L, alpha_grid=[0.0], choosable_PK=[[False, True, True], [False, False, False]])
    assert sel.chosen_P.tolist() == [1, -1] and sel.rejected_P.tolist() == [2, -1]
    sel = select_pairs(R, L, alpha_grid=[0.0], choosable_PK=[[True, True, False], [True, True, True]])
    assert sel.rejected_P.tolist() == [2, 2]  # a non-choosable answer is still the rejected one


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
        ICRSelectionConfig(condition="x")
    assert implicit_rewards([1.0, -2.0], [0.5, -1.0]).tolist() == [0.5, -1.0]


def test_icr_pairs_from_answers():
    instructions = {"q0": "x0", "q1": "x1", "q2": "x2"}
    answers = {"q0": ["a" * 300, "b" * 100, "c" * 50], "q1": ["d" * 100, "e" * 40, "f" * 200], "q2": ["", "only"]}
    rewards = {"q0": R[0], "q1": R[1], "q2": [9.0, 1.0]}
    no_language = PairFilterConfig(language=False)
    pairs, _sel, stats = icr_pairs(
        instructions, "fr", answers, rewards, ICRSelectionConfig(system_prompt="Sys"), no_language
    )
    assert stats == {
        "prompts": 3,
        "pairs": 2,
        "alpha": 0.009,
        "length_gap": pytest.approx(45.0),
        "dropped": {"empty": 1},
    }
    p0, p1 = pairs
    assert p0.prompt == [{"role": "system", "content": "Sys"}, {"role": "user", "content": "x0"}]
    assert (p0.chosen, p0.rejected, p0.chosen_from, p0.rejected_from) == ("a" * 300, "c" * 50, "sample:0", "sample:2")
    assert (p1.chosen, p1.rejected, p1.kind, p1.language, p1.id) == ("e" * 40, "f" * 200, "icr", "fr", "q1")
    assert {k: p0.meta[k] for k in ("reward_chosen", "reward_rejected", "alpha")} == {
        "reward_chosen": 3.0,
        "reward_rejected": 0.0,
        "alpha": 0.009,
    }
    assert set(p0.meta) == {"reward_chosen", "reward_rejected", "alpha", "chosen_detected", "rejected_detected"}
    with pytest.raises(ValueError, match=r"no answers or rewards for 1 prompt id\(s\) \(q3\)"):
        icr_pairs({**instructions, "q3": "x3"}, "fr", answers, rewards)
    with pytest.raises(ValueError, match="2 answers but 1 rewards"):
        icr_pairs(instructions, "fr", answers, {**rewards, "q2": [1.0]})


FR = "Les trois couleurs primaires sont le rouge, le bleu et le jaune."
EN = "The three primary colours are red, blue and yellow, as every painter knows."
DE = "Die drei Grundfarben sind Rot, Blau und Gelb, wie jeder Maler weiß."


def test_icr_never_chooses_a_wrong_language_answer():
    instructions = {"q0": "x0", "q1": "x1", "q2": "x2"}
    # q0: the English answer has the best reward but is never chosen; it may be rejected
    # q1: only English/German answers: no pair, reason "language"; q2: same text twice: "identical"
    answers = {"q0": [EN, FR, FR + " Voilà."], "q1": [EN, DE], "q2": [FR, FR, FR]}
    rewards = {"q0": [9.0, 2.0, 1.0], "q1": [3.0, 1.0], "q2": [2.0, 1.0, 2.0]}
    pairs, sel, stats = icr_pairs(instructions, "fr", answers, rewards, ICRSelectionConfig(alpha_max=0.001))
    assert [(p.id, p.chosen, p.rejected) for p in pairs] == [("q0", FR, FR + " Voilà.")]
    assert stats["dropped"] == {"language": 1, "identical": 1}
    assert pairs[0].meta["chosen_detected"] == "fr" and pairs[0].meta["rejected_detected"] == "fr"
    # the rejected may be in the wrong language: q0 with a low-reward English answer
    pairs, _, _ = icr_pairs(
        {"q0": "x"}, "fr", {"q0": [FR, EN]}, {"q0": [2.0, 1.0]}, ICRSelectionConfig(alpha_max=0.001)
    )
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].meta["rejected_detected"]) == (FR, EN, "en")
    # the papers' setting chooses the English answer
    pairs, _, stats = icr_pairs(instructions, "fr", answers, rewards, ICRSelectionConfig(alpha_max=0.001), PAPER)
    assert pairs[0].chosen == EN and stats["pairs"] == 3 and stats["dropped"] == {}  # q2's identical pair kept
    # length_cut (when on): a cut answer is not chosen either
    cut_on = PairFilterConfig(length_cut=True)
    pairs, _, _ = icr_pairs(
        {"q0": "x"},
        "fr",
        {"q0": [FR, FR + " Voilà."]},
        {"q0": [2.0, 1.0]},
        ICRSelectionConfig(alpha_max=0.001),
        cut_on,
        length_cut={"q0": [True, False]},
    )
    assert pairs == []


def test_scoring_never_cuts_a_prompt_and_scores_a_2400_token_answer_with_its_end_of_turn():
    from dpo_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    eot = tok.hf.convert_tokens_to_ids("<|im_end|>")
    long_prompt = [{"role": "user", "content": "q" * 5000}]
    answer = "a" * 2400  # 2,400 tokens with the character tokenizer
    enc = encode_answers(tok, [(long_prompt, answer)], max_answer_tokens=2401)  # the sampling limit + 1
    assert len(enc.prompt_ids[0]) == len(tok.chat_ids(long_prompt, add_generation_prompt=True)) > 5000
    chosen = enc.answer_ids[0].tolist()
    assert len(chosen) == 2401 and chosen[-1] == eot and chosen[:2400] == tok.encode(answer)
    # without the first token: it moves into the prompt
    enc2 = encode_answers(tok, [(long_prompt, answer)], max_answer_tokens=2401, score_first_token=False)
    assert enc2.prompt_ids[0].tolist() == enc.prompt_ids[0].tolist() + chosen[:1]
    assert enc2.answer_ids[0].tolist() == chosen[1:]


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
    enc = encode_answers(tok, items, max_answer_tokens=64)
    scoring = ScoringConfig(batch_size=4, logprob_chunk=8)
    logp_dpo = answer_logprobs(params_dpo, config, enc, scoring)
    logp_ref = answer_logprobs(params_ref, config, enc, scoring)
    reward = implicit_rewards(logp_dpo, logp_ref)
    rows = [(p.tolist(), r.tolist()) for p, r in zip(enc.prompt_ids, enc.answer_ids)]
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
        assert abs(logp_dpo[i] - want_dpo[i]) <= tol and abs(logp_ref[i] - want_ref[i]) <= tol
        assert abs(reward[i] - (want_dpo[i] - want_ref[i])) <= 2 * tol
    assert enc.truncated_answers == 0
    # the first answer token left out (the authors' masking): the sum loses exactly that token's log-prob
    first_out = answer_logprobs(params_dpo, config, encode_answers(tok, items, 64, score_first_token=False), scoring)
    logits = np.asarray(fwd(params_dpo, jnp.asarray(tokens))).astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    for i, (p, r) in enumerate(rows):
        first = logp[i, len(p) - 1, r[0]]
        assert abs(first_out[i] - (want_dpo[i] - first)) <= 1e-5 * max(1.0, abs(want_dpo[i]))
