"""ICR (Implicit Cross-Lingual Rewarding, Yang et al. 2025, arXiv 2503.04647): scoring and pair selection.

METHOD.md section 2. An English DPO model π_DPO and its reference π_ref define a reward
    r(x̃, y) = log π_DPO(y | x̃) − log π_ref(y | x̃)   (summed over the answer's tokens, end-of-turn included)
and conditioning on the ENGLISH instruction x̃ carries English preferences over to answers in X.
Per prompt, K sampled answers are ranked by r − α·len(y) (len in characters) with α chosen per
language so that chosen and rejected have, on average, the same length.

Here:
- `icr_scoring_prompt`: x̃ for the paper's method and its two baselines (`condition`);
- `scoring_inputs` / `answer_logprobs` / `score_answers`: token ids through the model's chat template
  (the same rule as DPO training, lidr_jax.train.pairs.response_ids) and batched log-probs
  (lidr_jax.train.dpo.sequence_logprobs);
- `implicit_rewards`, `select_pairs` (the α search, vectorised over prompts × alphas), `icr_pairs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lidr_jax.methods.languages import language_name
from lidr_jax.methods.lidr import Message, Pair, chat_prompt

Condition = Literal["english", "translated", "translate_answer"]
CONDITIONS = ("english", "translated", "translate_answer")


def language_prefix(lang: str) -> str:
    """The sentence put before the English instruction when scoring an answer in `lang`."""
    return f"Respond only in {language_name(lang)}, unless the instruction below asks for a different language."


def icr_scoring_prompt(
    english_instruction: str,
    lang: str,
    *,
    condition: Condition = "english",
    translated_instruction: str | None = None,
    system_prompt: str | None = None,
    dominant: str = "en",
) -> list[Message]:
    """The chat prompt x̃ under which an answer in `lang` is scored.

    condition="english" (the paper's method): the English instruction, prefixed for lang != en by
      `language_prefix(lang)`, so π_DPO judges an answer in X against what an English user asked.
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
    return chat_prompt(f"{language_prefix(lang)}\n\n{english_instruction}", system_prompt)


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
    length_gap: float  # mean len(chosen) − len(rejected) over kept prompts at `alpha` (characters)
    alphas_A: np.ndarray  # the grid searched
    gap_A: np.ndarray  # that mean gap at every alpha (inf where no prompt gives a pair)


def default_alpha_grid() -> np.ndarray:
    """0, 0.001, ..., 0.999 (METHOD.md 2.4); k/1000 rather than arange's running sum."""
    return np.arange(1000) / 1000.0


def select_pairs(
    rewards_PK,
    lengths_PK,
    alpha_grid=None,
    upper_bound: float | None = None,
    valid_PK=None,
    max_block_elems: int = 1 << 22,
) -> Selection:
    """Choose α and, per prompt, chosen = argmax, rejected = argmin of r − α·len over the K answers.

    α minimises |mean(len(chosen) − len(rejected))| over the grid (the first such α on ties), the mean
    taken over prompts that give a pair. `upper_bound`: answers whose reward r exceeds it cannot be
    chosen (they may still be rejected); it guards against reward hacking by degenerate answers.
    `valid_PK` (bool) marks real answers when prompts have fewer than K (padding) or unusable ones.
    A prompt gives no pair when no answer may be chosen, fewer than two answers are valid, or the
    chosen and rejected answers are the same one (all scores equal). Ties in the argmax/argmin go to
    the lower answer index. Vectorised over alphas × prompts × answers, in blocks of alphas that
    keep the [A, P, K] scores under `max_block_elems` elements.
    """
    r = np.asarray(rewards_PK, np.float64)
    L = np.asarray(lengths_PK, np.float64)
    if r.ndim != 2 or r.shape != L.shape:
        raise ValueError(f"rewards and lengths must both be [prompts, answers]; got {r.shape} and {L.shape}")
    valid = np.isfinite(r) if valid_PK is None else (np.asarray(valid_PK, bool) & np.isfinite(r))
    if valid.shape != r.shape:
        raise ValueError(f"valid_PK has shape {valid.shape}, expected {r.shape}")
    can_choose = valid & (r <= upper_bound) if upper_bound is not None else valid
    usable_P = can_choose.any(-1) & (valid.sum(-1) >= 2)
    alphas = default_alpha_grid() if alpha_grid is None else np.asarray(alpha_grid, np.float64).reshape(-1)
    if alphas.size == 0:
        raise ValueError("the alpha grid is empty")
    P, K = r.shape
    r0, L0 = np.where(valid, r, 0.0), np.where(valid, L, 0.0)  # keep NaN/inf padding out of the arithmetic
    block = max(1, max_block_elems // max(1, P * K))
    gaps, chosen_all, rejected_all = [], [], []
    for start in range(0, alphas.size, block):
        a_A = alphas[start : start + block]
        s_APK = r0[None] - a_A[:, None, None] * L0[None]
        c_AP = np.argmax(np.where(can_choose[None], s_APK, -np.inf), axis=-1)
        j_AP = np.argmin(np.where(valid[None], s_APK, np.inf), axis=-1)
        ok_AP = usable_P[None] & (c_AP != j_AP)
        gap_AP = (
            np.take_along_axis(L0[None], c_AP[..., None], -1)[..., 0]
            - np.take_along_axis(L0[None], j_AP[..., None], -1)[..., 0]
        )
        n_A = ok_AP.sum(-1)
        mean_A = np.where(n_A > 0, (gap_AP * ok_AP).sum(-1) / np.maximum(n_A, 1), np.inf)
        gaps.append(mean_A)
        chosen_all.append(np.where(ok_AP, c_AP, -1))
        rejected_all.append(np.where(ok_AP, j_AP, -1))
    gap_A = np.concatenate(gaps)
    best = int(np.argmin(np.abs(gap_A)))
    chosen_P = np.concatenate(chosen_all)[best]
    rejected_P = np.concatenate(rejected_all)[best]
    return Selection(float(alphas[best]), chosen_P, rejected_P, chosen_P >= 0, float(gap_A[best]), alphas, gap_A)


@dataclass(frozen=True)
class ICRSettings:
    """ICR settings (a config section). `system_prompt` goes into the training pairs' prompts; the
    scoring prompt's system turn is `scoring_system_prompt` (the paper uses none for either)."""

    condition: Condition = "english"
    upper_bound: float | None = None
    alpha_step: float = 0.001
    alpha_max: float = 1.0  # exclusive
    system_prompt: str | None = None
    scoring_system_prompt: str | None = None

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if not (self.alpha_step > 0 and self.alpha_max > 0):
            raise ValueError(f"alpha_step ({self.alpha_step}) and alpha_max ({self.alpha_max}) must be > 0")

    def alpha_grid(self) -> np.ndarray:
        n = round(self.alpha_max / self.alpha_step)
        return np.round(np.arange(n) * self.alpha_step, 12)  # 9 * 0.001 is 0.009000000000000001


def icr_pairs(
    instructions: Mapping[str, str],
    lang: str,
    answers: Mapping[str, Sequence[str]],
    rewards: Mapping[str, Sequence[float]],
    settings: ICRSettings = ICRSettings(),
) -> tuple[list[Pair], Selection, dict]:
    """ICR pairs for one language: prompt = the raw instruction x_X, chosen/rejected from its K answers.

    instructions: {id: x_X}; answers: {id: [K answer texts]} (K may differ per prompt); rewards:
    {id: [K rewards]} aligned with answers. Empty answers can be neither chosen nor rejected.
    Returns (pairs, selection, stats) with stats = {"prompts", "pairs", "no_pair", "alpha", "length_gap"}.
    """
    ids = [pid for pid in instructions if pid in answers]
    missing = [pid for pid in instructions if pid not in answers or pid not in rewards]
    if missing:
        raise ValueError(f"{lang}: no answers or rewards for {len(missing)} prompt id(s) ({', '.join(missing[:5])})")
    K = max((len(answers[pid]) for pid in ids), default=0)
    if K == 0:
        raise ValueError(f"{lang}: no answers to select pairs from")
    r_PK = np.full((len(ids), K), np.nan)
    L_PK = np.zeros((len(ids), K))
    for i, pid in enumerate(ids):
        if len(rewards[pid]) != len(answers[pid]):
            raise ValueError(f"{lang}/{pid}: {len(answers[pid])} answers but {len(rewards[pid])} rewards")
        for k, (text, rew) in enumerate(zip(answers[pid], rewards[pid])):
            if text.strip():
                r_PK[i, k], L_PK[i, k] = rew, len(text)
    sel = select_pairs(r_PK, L_PK, settings.alpha_grid(), settings.upper_bound)
    pairs = []
    for i, pid in enumerate(ids):
        if not sel.keep_P[i]:
            continue
        c, j = int(sel.chosen_P[i]), int(sel.rejected_P[i])
        meta = {"reward_chosen": float(r_PK[i, c]), "reward_rejected": float(r_PK[i, j]), "alpha": sel.alpha}
        pairs.append(
            Pair(
                chat_prompt(instructions[pid], settings.system_prompt),
                answers[pid][c],
                answers[pid][j],
                pid,
                lang,
                "icr",
                f"sample:{c}",
                f"sample:{j}",
                meta,
            )
        )
    stats = {
        "prompts": len(ids),
        "pairs": len(pairs),
        "no_pair": len(ids) - len(pairs),
        "alpha": sel.alpha,
        "length_gap": sel.length_gap,
    }
    return pairs, sel, stats


# ---------------------------------------------------------------- scoring with a model


def scoring_inputs(tokenizer, items: Sequence[tuple[Sequence[Message], str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per (messages, answer): the chat template's prompt with the
    generation prompt, and what the assistant turn adds (answer + end-of-turn), exactly as DPO
    training tokenizes a pair (lidr_jax.train.pairs.response_ids)."""
    from lidr_jax.train.pairs import response_ids

    out = []
    for messages, answer in items:
        messages = list(messages)
        prompt = tokenizer.chat_ids(messages, add_generation_prompt=True)
        response = response_ids(tokenizer, messages, [{"role": "assistant", "content": answer}])
        out.append((list(prompt), list(response)))
    return out


@dataclass(frozen=True)
class ScoringInputs:
    """Token ids to score, after the truncation rule of DPO training (prompt keeps its end,
    response keeps its start), with counts of what was cut."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    truncated_prompts: int
    truncated_responses: int


def truncate_inputs(
    rows: Sequence[tuple[list[int], list[int]]], max_prompt_len: int, max_response_len: int
) -> ScoringInputs:
    prompts, responses, tp, tr = [], [], 0, 0
    for p, r in rows:
        if len(p) > max_prompt_len:
            p, tp = p[-max_prompt_len:], tp + 1
        if len(r) > max_response_len:
            r, tr = r[:max_response_len], tr + 1
        prompts.append(list(p))
        responses.append(list(r))
    return ScoringInputs(prompts, responses, tp, tr)


def scoring_batch(prompt_ids, response_ids, pad_id: int, length: int) -> dict[str, np.ndarray]:
    """[B, length] arrays for lidr_jax.train.dpo.sequence_logprobs: tokens, next-token targets, a target
    mask that is 1 exactly on response tokens, and the attention mask (right padding)."""
    B = len(prompt_ids)
    tokens = np.full((B, length), pad_id, np.int32)
    response = np.zeros((B, length), bool)
    attention = np.zeros((B, length), bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        n = len(p) + len(r)
        if n > length:
            raise ValueError(f"a row of {n} tokens does not fit the batch length {length}")
        tokens[b, :n] = np.asarray(list(p) + list(r), np.int32)
        response[b, len(p) : n] = True
        attention[b, :n] = True
    targets = np.concatenate([tokens[:, 1:], np.full((B, 1), pad_id, np.int32)], axis=1)
    target_mask = np.concatenate([response[:, 1:], np.zeros((B, 1), bool)], axis=1)
    return {"tokens": tokens, "targets": targets, "target_mask": target_mask, "attention_mask": attention}


_JITTED = {}


def _logprob_fn(chunk: int):
    if chunk not in _JITTED:
        import jax

        from lidr_jax.train.dpo import sequence_logprobs

        _JITTED[chunk] = jax.jit(
            lambda params, batch, config: sequence_logprobs(params, batch, config, chunk=chunk), static_argnums=2
        )
    return _JITTED[chunk]


def answer_logprobs(
    params,
    config,
    inputs: ScoringInputs,
    pad_id: int,
    *,
    batch_size: int = 8,
    chunk: int = 256,
    bucket_multiple: int = 0,
) -> np.ndarray:
    """Summed log-prob of each response given its prompt under `params` ([N] float64).

    Rows are sorted by length and batched with bucketed lengths (lidr_jax.train.pairs.bucket_length), so
    there is one compilation per bucket; a short last batch is filled with copies whose results are
    dropped, so shapes stay static.
    """
    from lidr_jax.train.pairs import bucket_length

    N = len(inputs.prompt_ids)
    total = np.array([len(p) + len(r) for p, r in zip(inputs.prompt_ids, inputs.response_ids)], np.int64)
    order = np.argsort(total, kind="stable")
    out = np.zeros(N, np.float64)
    fn = _logprob_fn(chunk)
    for start in range(0, N, batch_size):
        idx = list(order[start : start + batch_size])
        fill = idx + [idx[0]] * (batch_size - len(idx))
        T = bucket_length(int(total[idx].max()), bucket_multiple)
        batch = scoring_batch([inputs.prompt_ids[i] for i in fill], [inputs.response_ids[i] for i in fill], pad_id, T)
        logp, _ = fn(params, batch, config)
        out[idx] = np.asarray(logp, np.float64)[: len(idx)]
    return out


def score_answers(
    model_dpo_params,
    model_ref_params,
    config,
    tokenizer,
    items: Sequence[tuple[Sequence[Message], str]],
    *,
    batch_size: int = 8,
    max_prompt_len: int = 1024,
    max_response_len: int = 2048,
    chunk: int = 256,
    bucket_multiple: int = 0,
) -> dict:
    """Implicit rewards of (scoring messages, answer) items: {"reward", "logp_dpo", "logp_ref" ([N]
    float64), "response_tokens" ([N]), "truncated_prompts", "truncated_responses"}.

    Both param trees share `config` and `tokenizer` (π_DPO and its reference are the same
    architecture). To keep one model resident at a time, call `answer_logprobs` once per model with
    the same `ScoringInputs` and combine with `implicit_rewards`.
    """
    inputs = truncate_inputs(scoring_inputs(tokenizer, items), max_prompt_len, max_response_len)
    kw = {"batch_size": batch_size, "chunk": chunk, "bucket_multiple": bucket_multiple}
    logp_dpo = answer_logprobs(model_dpo_params, config, inputs, tokenizer.pad_token_id, **kw)
    logp_ref = answer_logprobs(model_ref_params, config, inputs, tokenizer.pad_token_id, **kw)
    return {
        "reward": implicit_rewards(logp_dpo, logp_ref),
        "logp_dpo": logp_dpo,
        "logp_ref": logp_ref,
        "response_tokens": np.array([len(r) for r in inputs.response_ids]),
        "truncated_prompts": inputs.truncated_prompts,
        "truncated_responses": inputs.truncated_responses,
    }
