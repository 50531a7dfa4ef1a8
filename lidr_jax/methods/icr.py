"""ICR (Implicit Cross-Lingual Rewarding, Yang et al. 2025, arXiv 2503.04647): scoring and pair selection.

docs/method.md section 2. An English DPO model π_DPO and its reference π_ref define a reward
    r(x̃, y) = log π_DPO(y | x̃) − log π_ref(y | x̃)   (summed over the answer's tokens, end-of-turn included)
and conditioning on the ENGLISH instruction x̃ carries English preferences over to answers in X.
Per prompt, K sampled answers are ranked by r − α·len(y) (len in characters) with α chosen per
language so that chosen and rejected have, on average, the same length.

Here:
- `ICRSelectionConfig`: selection, the texts ICR sends (the language prefix, system prompts, the
  translate-the-answer baseline's request), and how answers are scored;
- `icr_scoring_prompt`: x̃ for the paper's method and its two baselines (`condition`);
- answers are tokenized and scored by lidr_jax.model.scoring (`encode_answers`, `score_answers`, the
  pass DPO's reference log-probs use too); no prompt is cut, and an answer is cut only past
  `max_score_tokens`;
- `implicit_rewards`, `select_pairs` (the α search, vectorised over prompts × alphas), `icr_pairs`
  (which never picks an answer that fails the quality filters as chosen, lidr_jax.methods.filters).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lidr_jax.methods.filters import PairFilterConfig, answer_reason, provenance
from lidr_jax.methods.languages import language_name
from lidr_jax.methods.lidr import Message, Pair, TranslationPrompt, chat_prompt, check_template
from lidr_jax.settings import check_settings, setting

Condition = Literal["english", "translated", "translate_answer"]
CONDITIONS = ("english", "translated", "translate_answer")

# Our own wording (the authors' text is in their repository: docs/reproducing.md).
DEFAULT_LANGUAGE_PREFIX = "Respond only in {language}, unless the instruction below asks for a different language."


def language_prefix(lang: str, template: str = DEFAULT_LANGUAGE_PREFIX) -> str:
    """The sentence put before the English instruction when scoring an answer in `lang`."""
    return template.format(language=language_name(lang))


def icr_scoring_prompt(
    english_instruction: str,
    lang: str,
    *,
    condition: Condition = "english",
    translated_instruction: str | None = None,
    system_prompt: str | None = None,
    dominant: str = "en",
    prefix_template: str = DEFAULT_LANGUAGE_PREFIX,
) -> list[Message]:
    """The chat prompt x̃ under which an answer in `lang` is scored.

    condition="english" (the paper's method): the English instruction, prefixed for lang != en by
      `language_prefix(lang, prefix_template)`, so π_DPO judges an answer in X against what an
      English user asked.
    condition="translated" (baseline): the instruction in X itself (`translated_instruction`).
    condition="translate_answer" (baseline): the plain English instruction; the caller translates
      each answer into English first (lidr.translation_request) and scores the translation.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"ICR scoring condition must be one of {CONDITIONS}, got {condition!r}")
    language_name(lang)  # unknown codes fail here, before any model work
    if lang == dominant or condition == "translate_answer":
        return chat_prompt(english_instruction, system_prompt)
    if condition == "translated":
        if translated_instruction is None:
            raise ValueError(f"condition 'translated' needs the {lang} instruction (translated_instruction)")
        return chat_prompt(translated_instruction, system_prompt)
    return chat_prompt(f"{language_prefix(lang, prefix_template)}\n\n{english_instruction}", system_prompt)


def without_input(instruction: str, input_text: str | None) -> str:
    """The instruction without its Alpaca `input` field (joined on a new line when the prompts were
    read: lidr_jax.methods.prompt_sets); unchanged when it has none."""
    tail = "\n" + input_text if input_text else None
    return instruction[: -len(tail)] if tail and instruction.endswith(tail) else instruction


def implicit_rewards(logp_dpo, logp_ref) -> np.ndarray:
    """r = log π_DPO(y|x̃) − log π_ref(y|x̃), elementwise, float64. No β: it does not change a ranking."""
    a, b = np.asarray(logp_dpo, np.float64), np.asarray(logp_ref, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"log-prob arrays differ in shape: {a.shape} vs {b.shape}")
    return a - b


# ---------------------------------------------------------------- length-controlled selection


@dataclass(frozen=True)
class Selection:
    """Result of `select_pairs` for one language (P prompts)."""

    alpha: float
    chosen_P: np.ndarray  # index of the chosen answer, -1 where the prompt gives no pair
    rejected_P: np.ndarray  # index of the rejected answer, -1 likewise
    keep_P: np.ndarray  # bool: the prompt gives a pair
    length_gap: float  # mean len(chosen) − len(rejected) over the kept prompts (characters)
    alphas_A: np.ndarray  # the grid searched
    gap_A: np.ndarray  # the search's mean gap at every alpha (inf where no prompt gives a pair)
    bounded_P: np.ndarray  # bool: the upper bound left the prompt no answer to choose


def length_alpha_grid(step: float = 0.001, maximum: float = 1.0) -> np.ndarray:
    """The α searched by `select_pairs`: 0, step, 2·step, ... below `maximum` (default 0, 0.001, ..., 0.999:
    docs/method.md 2.4), each the double nearest k·step (9 * 0.001 in floating point is 0.009000000000000001)."""
    return np.round(np.arange(round(maximum / step)) * step, 12)


def select_pairs(
    rewards_PK,
    lengths_PK,
    alpha_grid=None,
    upper_bound: float | None = None,
    valid_PK=None,
    choosable_PK=None,
    max_block_elems: int = 1 << 22,
    upper_bound_empty: str = "drop",
) -> Selection:
    """Choose α and, per prompt, chosen = argmax, rejected = argmin of s = r − α·len over the K answers.

    α minimises |mean(len(chosen) − len(rejected))| over the grid (the first such α on ties), the mean
    taken over prompts that give a pair. `valid_PK` (bool) marks real answers (padding, unusable
    ones are False): only they can be chosen or rejected. `choosable_PK` (bool) marks the answers that
    may be chosen (the quality filters: a wrong-language answer may still be rejected).
    `upper_bound`, as in the authors' code: the α search ignores it; then, at that α, an answer may be
    chosen only when its length-adjusted score s is strictly below the bound. When no answer of a
    prompt is under it, `upper_bound_empty` "drop" (the project's choice) gives the prompt no pair;
    "first" chooses its first answer that may be chosen, as the authors' argmax over all -inf picks
    answer 0 (`bounded_P` marks both). A prompt gives no pair when no answer may be chosen, fewer
    than two answers are valid, or chosen and rejected are the same answer (all scores equal); the
    authors write that pair (docs/reproducing.md). Ties in the argmax/argmin go to the lower index.
    Vectorised over alphas × prompts × answers, in blocks of alphas that keep the [A, P, K] scores
    under `max_block_elems` elements.
    """
    r = np.asarray(rewards_PK, np.float64)
    L = np.asarray(lengths_PK, np.float64)
    if r.ndim != 2 or r.shape != L.shape:
        raise ValueError(f"rewards and lengths must both be [prompts, answers]; got {r.shape} and {L.shape}")
    valid = np.isfinite(r) if valid_PK is None else (np.asarray(valid_PK, bool) & np.isfinite(r))
    if valid.shape != r.shape:
        raise ValueError(f"valid_PK has shape {valid.shape}, expected {r.shape}")
    can_choose = valid if choosable_PK is None else valid & np.asarray(choosable_PK, bool)
    if can_choose.shape != r.shape:
        raise ValueError(f"choosable_PK has shape {can_choose.shape}, expected {r.shape}")
    usable_P = can_choose.any(-1) & (valid.sum(-1) >= 2)
    alphas = length_alpha_grid() if alpha_grid is None else np.asarray(alpha_grid, np.float64).reshape(-1)
    if alphas.size == 0:
        raise ValueError("the alpha grid is empty")
    P, K = r.shape
    r0, L0 = np.where(valid, r, 0.0), np.where(valid, L, 0.0)  # keep NaN/inf padding out of the arithmetic

    def pick(a_A, chooser_APK):
        s_APK = r0[None] - a_A[:, None, None] * L0[None]
        c_AP = np.argmax(np.where(chooser_APK, s_APK, -np.inf), axis=-1)
        j_AP = np.argmin(np.where(valid[None], s_APK, np.inf), axis=-1)
        ok_AP = usable_P[None] & chooser_APK.any(-1) & (c_AP != j_AP)
        gap_AP = (
            np.take_along_axis(L0[None], c_AP[..., None], -1)[..., 0]
            - np.take_along_axis(L0[None], j_AP[..., None], -1)[..., 0]
        )
        n_A = ok_AP.sum(-1)
        mean_A = np.where(n_A > 0, (gap_AP * ok_AP).sum(-1) / np.maximum(n_A, 1), np.inf)
        return np.where(ok_AP, c_AP, -1), np.where(ok_AP, j_AP, -1), mean_A, s_APK

    block = max(1, max_block_elems // max(1, P * K))
    gaps = [pick(alphas[i : i + block], can_choose[None])[2] for i in range(0, alphas.size, block)]
    gap_A = np.concatenate(gaps)
    best = int(np.argmin(np.abs(gap_A)))
    alpha = alphas[best : best + 1]
    chooser = can_choose[None]
    if upper_bound_empty not in ("drop", "first"):
        raise ValueError(f"upper_bound_empty must be 'drop' or 'first', got {upper_bound_empty!r}")
    if upper_bound is not None:
        s_1PK = r0[None] - alpha[:, None, None] * L0[None]
        chooser = chooser & (s_1PK < upper_bound)
    bounded_P = usable_P & ~chooser[0].any(-1)
    if upper_bound_empty == "first":
        first_P = np.argmax(can_choose, axis=-1)  # the first answer that may be chosen
        only_first_PK = np.arange(K)[None, :] == first_P[:, None]
        chooser = np.where(bounded_P[None, :, None], only_first_PK[None] & can_choose[None], chooser)
    c, j, mean, _ = pick(alpha, chooser)
    return Selection(float(alpha[0]), c[0], j[0], c[0] >= 0, float(mean[0]), alphas, gap_A, bounded_P)


@dataclass(frozen=True)
class ICRSelectionConfig:
    """ICR settings (a config section). The paper uses no system prompt anywhere."""

    condition: Condition = setting(
        "english", "the instruction answers are scored under: english (the paper) | translated | translate_answer"
    )
    upper_bound: float | None = setting(
        None, "`select_pairs`: only answers scoring strictly below it (length-adjusted, after the α search) are chosen"
    )
    upper_bound_empty: Literal["drop", "first"] = setting(
        "drop", "a prompt with no answer under the bound: drop it, or choose its first answer (the authors' code)"
    )
    strip_for_length: bool = setting(
        False, "len(y) without leading/trailing whitespace (the authors strip answers); false: the text as sampled"
    )
    scoring_input: bool = setting(
        True, "the scoring instruction keeps a prompt's Alpaca `input`; false scores under the instruction alone"
    )
    alpha_step: float = setting(0.001, "spacing of the length-adjustment grid searched for α", gt=0)
    alpha_max: float = setting(1.0, "the grid's end (exclusive)", gt=0)
    system_prompt: str | None = setting(None, "the system turn of the training pairs (null = none)")
    scoring_system_prompt: str | None = setting(None, "the system turn when scoring (null = none)")
    generation_system_prompt: str | None = setting(None, "the system turn when sampling (null = none)")
    language_prefix: str = setting(
        DEFAULT_LANGUAGE_PREFIX, "the sentence before the English instruction when scoring ({language})"
    )
    translation: TranslationPrompt = setting(
        TranslationPrompt(), "translate_answer's request; a translation without a closing tag keeps its text"
    )
    score_first_token: bool = setting(
        True, "score the answer's first token too (the project's choice); false leaves it out, as the authors do"
    )
    max_score_tokens: int | None = setting(
        None,
        "answer tokens scored, end-of-turn included; longer answers are cut (counted); null = the sampling "
        "limit + 1, so no sampled answer is cut",
        ge=2,
    )
    english_pairs: bool = setting(
        True, "pairs for the dominant language too; the authors' translate-the-answer baseline skips them"
    )

    def __post_init__(self):
        check_settings(self)
        check_template(self.language_prefix, (), ("language",), "ICR language prefix")

    def alpha_grid(self) -> np.ndarray:
        return length_alpha_grid(self.alpha_step, self.alpha_max)


def icr_pairs(
    instructions: Mapping[str, str],
    lang: str,
    answers: Mapping[str, Sequence[str]],
    rewards: Mapping[str, Sequence[float]],
    settings: ICRSelectionConfig = ICRSelectionConfig(),
    filters: PairFilterConfig | None = None,
    *,
    length_cut: Mapping[str, Sequence[bool]] | None = None,
    dominant: str = "en",
    prompt_cut: Collection[str] = (),
) -> tuple[list[Pair], Selection, dict]:
    """ICR pairs for one language: prompt = the raw instruction x_X, chosen/rejected from its K answers.

    instructions: {id: x_X}; answers: {id: [K answer texts]} (K may differ per prompt); rewards:
    {id: [K rewards]} aligned with answers (NaN: not scored); length_cut: {id: [K bools]}, answers
    that stopped at the token limit; dominant: the run's dominant language (the language filter's
    rule for short answers, lidr_jax.methods.filters); prompt_cut: ids whose sampling prompt was over
    the prompt limit and was not sampled (dropped, counted as "prompt_cut"). An empty answer can be
    neither chosen nor rejected (unless the `empty` filter is off); an answer failing another filter
    (language, length_cut, repetition) can be rejected but never chosen. Returns (pairs, selection,
    stats): stats = {"prompts", "pairs", "alpha", "length_gap", "dropped": {reason: prompts}}, reasons
    of lidr_jax.methods.filters.
    """
    filters = PairFilterConfig() if filters is None else filters
    missing = [pid for pid in instructions if pid not in answers or pid not in rewards]
    if missing:
        raise ValueError(f"{lang}: no answers or rewards for {len(missing)} prompt id(s) ({', '.join(missing[:5])})")
    cut_prompts = [pid for pid in instructions if pid in set(prompt_cut)]
    ids = [pid for pid in instructions if pid not in set(prompt_cut)]
    K = max((len(answers[pid]) for pid in ids), default=0)
    if K == 0:
        raise ValueError(f"{lang}: no answers to select pairs from")
    r_PK = np.full((len(ids), K), np.nan)
    L_PK = np.zeros((len(ids), K))
    valid = np.zeros((len(ids), K), bool)
    choosable = np.zeros((len(ids), K), bool)
    why: list[Counter] = []
    for i, pid in enumerate(ids):
        if len(rewards[pid]) != len(answers[pid]):
            raise ValueError(f"{lang}/{pid}: {len(answers[pid])} answers but {len(rewards[pid])} rewards")
        cuts = (length_cut or {}).get(pid) or [False] * len(answers[pid])
        why.append(Counter())
        for k, (text, rew) in enumerate(zip(answers[pid], rewards[pid])):
            r_PK[i, k], L_PK[i, k] = rew, len(text.strip() if settings.strip_for_length else text)
            valid[i, k] = bool(text.strip()) or not filters.empty
            reason = answer_reason(text, lang, filters, cut=bool(cuts[k]), dominant=dominant)
            choosable[i, k] = reason is None
            if reason is not None:
                why[i][reason] += 1
    sel = select_pairs(
        r_PK,
        L_PK,
        settings.alpha_grid(),
        settings.upper_bound,
        valid,
        choosable,
        upper_bound_empty=settings.upper_bound_empty,
    )
    pairs, dropped = [], Counter({"prompt_cut": len(cut_prompts)} if cut_prompts else {})
    for i, pid in enumerate(ids):
        if not sel.keep_P[i]:
            dropped[_no_pair_reason(valid[i], choosable[i], why[i], bool(sel.bounded_P[i]))] += 1
            continue
        c, j = int(sel.chosen_P[i]), int(sel.rejected_P[i])
        chosen, rejected = answers[pid][c], answers[pid][j]
        if filters.identical and chosen.strip() == rejected.strip():
            dropped["identical"] += 1
            continue
        meta = {
            "reward_chosen": float(r_PK[i, c]),
            "reward_rejected": float(r_PK[i, j]),
            "alpha": sel.alpha,
            **provenance(chosen, rejected, filters),
        }
        pairs.append(
            Pair(
                chat_prompt(instructions[pid], settings.system_prompt),
                chosen,
                rejected,
                pid,
                lang,
                "icr",
                f"sample:{c}",
                f"sample:{j}",
                meta,
            )
        )
    stats = {
        "prompts": len(ids) + len(cut_prompts),
        "pairs": len(pairs),
        "alpha": sel.alpha,
        "length_gap": sel.length_gap,
        "dropped": dict(dropped),
    }
    return pairs, sel, stats


def _no_pair_reason(valid_K, choosable_K, why: Counter, bounded: bool) -> str:
    """Why a prompt gave no pair: too few usable answers because they were empty ("empty"), none
    choosable (the filter that excluded most answers), every choosable one at or above the upper
    bound ("upper_bound"), else "no_pair" (fewer than two answers, or all scored the same)."""
    if valid_K.sum() < 2:
        return "empty" if why.get("empty") else "no_pair"
    if not (valid_K & choosable_K).any():
        rest = Counter({k: n for k, n in why.items() if k != "empty"})
        return rest.most_common(1)[0][0] if rest else "empty"
    return "upper_bound" if bounded else "no_pair"
