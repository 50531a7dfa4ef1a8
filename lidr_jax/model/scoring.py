"""Log-probs of answers under a model: how a scoring pass computes (`ScoringConfig`) and the pass itself.

Every pass that scores answers runs `score_answers` (or, with its own row layout, `scoring_pass`):
ICR's implicit reward (lidr_jax.methods.icr), the held-out check's reference log-likelihood
(lidr_jax.eval.heldout) and DPO's reference pass (lidr_jax.train.trainer.reference_logprobs, which
packs several pairs per row with lidr_jax.train.packing when asked to). The DPO train step computes with
the same `ScoringConfig` (the `dpo.compute` group).

Row layout (`answer_batch`): one row per prompt, `prompt | answer | second answer | padding`, the
prompt run once for both answers (the second answer, a preference pair's rejected one, attends to the
prompt and to itself, never to the first; its positions continue from the prompt's end). Rows without
a second answer are `prompt | answer`. Segments follow lidr_jax.model.segments (0 prompt, 1 answer,
2 second answer). Only answer tokens are scored: one entry per answer token, predicted by the logits of
the position before it (the prompt's last token for either answer's first token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import numpy as np

from lidr_jax.model.attention import IMPLEMENTATIONS, resolve
from lidr_jax.model.llama import REMAT_POLICIES
from lidr_jax.model.logprobs import pair_logprobs
from lidr_jax.parallel.multihost import put_process_rows
from lidr_jax.parallel.sharding import batch_split, rows_for, to_host
from lidr_jax.progress import progress as progress_bar
from lidr_jax.settings import check_settings, setting
from lidr_jax.shapes import bucket

# The choices the model layer defines, spelled once there (a Literal of a tuple is a Literal of its items).
Attention = Literal[IMPLEMENTATIONS]
# auto: the DPO train step's policy chosen from memory (lidr_jax.train.autotune); a pass without gradients keeps nothing
Remat = Literal[(*REMAT_POLICIES, "auto")]


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """How a forward pass over answers computes (the DPO train step and every scoring pass)."""

    attention: Attention = setting(
        "auto",
        "auto | xla | cudnn | splash (lidr_jax.model.attention; auto: the backend's fused kernel where it applies)",
    )
    remat: Remat = setting("none", "activation recomputation in the layer scan (training): none | full | dots, ...")
    compute_dtype: Literal["float32", "bfloat16"] = setting(
        "float32", "matmul dtype; weights (and Adam state) stay float32"
    )
    logprob_chunk: int = setting(
        256, "answer tokens per log-softmax chunk, recomputed in backward (0: one chunk, kept)", ge=0
    )
    batch_size: int = setting(8, "rows per forward of a scoring pass (the DPO reference pass: pairs)", ge=1)

    def __post_init__(self):
        check_settings(self)

    def replace(self, **changes) -> ScoringConfig:
        return dataclasses.replace(self, **changes)

    def model_config(self, config):
        """The model's config with this pass's compute dtype."""
        return config.replace(dtype=self.compute_dtype)

    def attention_impl(self, shared_prompt: bool) -> str:
        """The attention implementation of a pass (lidr_jax.model.attention.resolve) over rows where a
        prompt is (`answer_batch` with second answers, packing with share_prompt) or is not seen by two
        answers."""
        return resolve(self.attention, dtype=self.compute_dtype, shared_prompt=shared_prompt)


def answer_token_ids(tokenizer, prompt: list[dict], answer: list[dict]) -> list[int]:
    """Ids of what the assistant turn adds after the prompt's rendering (text + end-of-turn): the tokens
    of an answer that a scoring pass scores. `prompt` and `answer`: chat turns."""
    prompt_text = tokenizer.render_chat(prompt, add_generation_prompt=True)
    full_text = tokenizer.render_chat(prompt + answer, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the prompt differently with and without the answer, so the "
            "response cannot be cut off the full conversation; use a template whose rendering of "
            f"the prompt is a prefix of the conversation's (prompt ends with {prompt_text[-40:]!r})"
        )
    return tokenizer.encode(full_text[len(prompt_text) :], add_special_tokens=False)


@dataclasses.dataclass
class AnswerRows:
    """Token ids to score: N prompts, each with its answer and, for a preference pair, a second answer
    (the rejected one, scored after the same prompt). `truncated_answers`: answers cut when encoded."""

    prompt_ids: list[np.ndarray]
    answer_ids: list[np.ndarray]
    second_ids: list[np.ndarray] | None = None
    truncated_answers: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def lengths(self) -> np.ndarray:
        """Tokens of each row of `answer_batch`: prompt + answer (+ second answer)."""
        n = np.array([len(p) + len(a) for p, a in zip(self.prompt_ids, self.answer_ids)], np.int64)
        return n if self.second_ids is None else n + np.array([len(s) for s in self.second_ids], np.int64)

    def answer_lengths(self) -> np.ndarray:
        """Scored tokens of each answer (the second answer's are not counted)."""
        return np.array([len(a) for a in self.answer_ids], np.int64)


def encode_answers(
    tokenizer, items: Sequence[tuple[Sequence[dict], str]], max_answer_tokens: int, score_first_token: bool = True
) -> AnswerRows:
    """Each (prompt messages, answer text) as token ids: the prompt as the chat template renders it with
    the generation prompt, the answer as what the assistant turn adds (`answer_token_ids`: the text and
    end-of-turn). No prompt is cut; an answer is cut to `max_answer_tokens` (keeping its start, counted).
    `score_first_token` False moves the answer's first token into the prompt, so it is not scored."""
    rows = AnswerRows([], [])
    for messages, answer in items:
        prompt = list(messages)
        ids = answer_token_ids(tokenizer, prompt, [{"role": "assistant", "content": answer}])
        if len(ids) > max_answer_tokens:
            ids = ids[:max_answer_tokens]
            rows.truncated_answers += 1
        prompt_ids = list(tokenizer.chat_ids(prompt, add_generation_prompt=True))
        if not score_first_token:
            if len(ids) < 2:
                raise ValueError("an answer with no token before its end-of-turn cannot leave its first token out")
            prompt_ids, ids = prompt_ids + ids[:1], ids[1:]
        rows.prompt_ids.append(np.asarray(prompt_ids, np.int32))
        rows.answer_ids.append(np.asarray(ids, np.int32))
    return rows


def bucket_length(n: int, multiple: int = 0, minimum: int = 16) -> int:
    """Padded length for a row of `n` tokens. `multiple` 0: the next power of two (>= minimum) up
    to 256, then the next multiple of 128 (so a 384-token row is not padded to 512); else the next
    multiple of `multiple`. Few distinct lengths means few compilations."""
    if multiple > 0:
        return bucket(n, minimum=multiple, knee=0, step=multiple)
    return bucket(n, minimum=minimum, knee=256, step=128)


def answer_batch(
    rows: AnswerRows,
    indices: Sequence[int],
    pad_id: int,
    *,
    batch_size: int | None = None,
    length: int | None = None,
    entries: int | None = None,
    bucket_multiple: int = 0,
) -> dict[str, np.ndarray]:
    """Rows `indices` in the layout of the module docstring, padded with copies of the first row up to
    `batch_size` rows (so shapes stay static; the caller ignores them).

    Keys, [B, T]: tokens, positions, segments, attention_mask (real tokens). Keys, [B, E]: one entry per
    answer token to score: logit_index (the position whose logits predict it), targets (the token),
    chosen_mask / rejected_mask (which answer it belongs to: the first or the second; padding entries are
    in neither). T and E are bucketed (`bucket_length`); `length` forces T and `entries` forces E (each
    must fit every row).
    """
    indices = list(indices)
    B = batch_size or len(indices)
    if len(indices) > B:
        raise ValueError(f"{len(indices)} rows do not fit a batch of {B}")
    fill = indices + [indices[0]] * (B - len(indices))
    empty = np.zeros(0, np.int32)
    second = rows.second_ids
    rows = [(rows.prompt_ids[i], rows.answer_ids[i], empty if second is None else second[i]) for i in fill]
    longest = max(len(p) + len(c) + len(r) for p, c, r in rows)
    T = length or bucket_length(longest, bucket_multiple)
    if longest > T:
        raise ValueError(f"a row of {longest} tokens does not fit the batch length {T}")
    scored = max(len(c) + len(r) for _, c, r in rows)
    E = entries or bucket_length(scored, bucket_multiple)
    if scored > E:
        raise ValueError(f"{scored} answer tokens do not fit the batch's {E} entries")
    out = {
        "tokens": np.full((B, T), pad_id, np.int32),
        "positions": np.zeros((B, T), np.int32),
        "segments": np.zeros((B, T), np.int32),
        "attention_mask": np.zeros((B, T), bool),
        "logit_index": np.zeros((B, E), np.int32),
        "targets": np.full((B, E), pad_id, np.int32),
        "chosen_mask": np.zeros((B, E), bool),
        "rejected_mask": np.zeros((B, E), bool),
    }
    for b, (p, c, r) in enumerate(rows):
        P, C, R = len(p), len(c), len(r)
        n = P + C + R
        out["tokens"][b, :n] = np.concatenate([p, c, r])
        out["positions"][b, :n] = np.concatenate([np.arange(P + C), P + np.arange(R)])
        out["segments"][b, P : P + C], out["segments"][b, P + C : n] = 1, 2
        out["attention_mask"][b, :n] = True
        # Answer token k is predicted at its previous token's position; k = 0 at the prompt's last.
        second = [[P - 1], P + C + np.arange(R - 1)] if R else []
        out["logit_index"][b, : C + R] = np.concatenate([P - 1 + np.arange(C), *second])
        out["targets"][b, : C + R] = np.concatenate([c, r])
        out["chosen_mask"][b, :C], out["rejected_mask"][b, C : C + R] = True, True
    return out


def batch_logprobs(params, batch, config, cfg: ScoringConfig, shared_prompt: bool = True):
    """Summed log-probs of an `answer_batch`'s answers with the settings' chunk, remat and attention:
    (first [B], second [B], first's token count [B]), float32 (`config` already in the compute dtype)."""
    impl = cfg.attention_impl(shared_prompt)
    remat = "none" if cfg.remat == "auto" else cfg.remat  # auto is resolved before training
    return pair_logprobs(params, batch, config, chunk=cfg.logprob_chunk, remat=remat, attention=impl)


def scoring_pass(
    params,
    lengths: np.ndarray,
    make_batch: Callable[[np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]],
    logprobs: Callable,
    batch_size: int,
    *,
    progress: bool = False,
    desc: str = "log-probs",
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs of N items, `batch_size` at a time in order of `lengths` (so a batch pads little):
    (first [N], second [N]) float32.

    `make_batch(indices)` gives the host batch of those items and, for each row of `logprobs`' outputs,
    the item it holds (-1: a filler row); `logprobs(params, batch)` gives (first, second) per output row.
    It is jitted here once: one compilation per distinct batch shape. Batches are placed with
    lidr_jax.parallel.multihost.put_process_rows, so several processes score their own rows of a batch.
    """
    fn = jax.jit(logprobs)
    N = len(lengths)
    order = np.argsort(lengths, kind="stable")
    first, second = np.zeros(N, np.float32), np.zeros(N, np.float32)
    bar = progress_bar(N, desc, "item", enabled=progress)
    for start in range(0, N, batch_size):
        idx = order[start : start + batch_size]
        batch, item = make_batch(idx)
        a, b = map(to_host, fn(params, put_process_rows(batch)))
        keep = item >= 0
        first[item[keep]], second[item[keep]] = a[keep], b[keep]
        bar.update(len(idx))
    bar.close()
    return first, second


def score_answers(
    params,
    model_config,
    rows: AnswerRows,
    cfg: ScoringConfig,
    *,
    bucket_multiple: int = 0,
    progress: bool = False,
    desc: str = "log-probs",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-prob of every answer after its prompt under `params`: (first [N], second [N]) float32,
    `second` the log-probs of `rows.second_ids` (a preference pair's rejected answers: the prompt is run
    once for both) or zeros without them. Rows in the `answer_batch` layout, `cfg.batch_size` per forward
    (rounded up to a multiple of the ways an active mesh splits rows, so every device gets a share),
    sorted by length, lengths bucketed by `bucket_multiple` (one compilation per bucket)."""
    config = cfg.model_config(model_config)
    shared = rows.second_ids is not None
    B = rows_for(cfg.batch_size, batch_split())

    def make_batch(idx):
        batch = answer_batch(rows, idx, pad_id=0, batch_size=B, bucket_multiple=bucket_multiple)
        return batch, np.concatenate([idx, np.full(B - len(idx), -1)])

    def logprobs(p, b):
        return batch_logprobs(p, b, config, cfg, shared_prompt=shared)[:2]

    return scoring_pass(params, rows.lengths(), make_batch, logprobs, B, progress=progress, desc=desc)
