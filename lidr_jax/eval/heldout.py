"""The held-out measurement: per language, numbers with intervals, so an effect can be told from noise.

On prompts never trained on (lidr_jax.methods.prompt_sets, the "heldout" split; "dev" while choosing
settings), for each language and each checkpoint:

- **in-language share**: the fraction of answers whose detected language (lidr_jax.methods.langid) is
  the language asked in: one minus the papers' off-target rate. Translation tasks are left out: their
  right answer is in another language.
- **answer length**: mean generated tokens and mean characters.
- **reference log-likelihood**: the mean per-token log-probability the model gives to a fixed, correct
  reference answer written in the asked language (the prompt set's `reference` field), averaged over
  prompts. It needs no judge and is meaningful because it moves the way answer quality does in the
  two ways this project cares about: a model that drifts toward English, or toward degenerate text,
  gives less probability to fluent, correct text in the asked language, and a model that gets better
  in that language gives it more. It is deterministic (no sampling), so small changes are visible at
  48 prompts. Its limits: it scores the model's distribution, not the answer it actually writes; DPO
  is known to lower the likelihood of good answers somewhat even as preference accuracy rises (the
  NLL term in LIDR/ICR training counteracts it), so a small drop is a warning, not a verdict. Read it
  beside the in-language share and, in English, as the "no loss" check.

Intervals are percentile bootstrap intervals over prompts: the prompts are resampled with replacement
`resamples` times with a generator seeded by `seed` and the interval is the (1 - level)/2 and
(1 + level)/2 quantiles of the resampled means. The same seed is used for every language and
checkpoint, so two checkpoints answered on the same prompts are resampled the same way;
`paired_change` gives the interval of the change between them (the test of "rises by more than its
interval").

Pure functions over answers (`bootstrap_mean`, `paired_change`, `in_language`, `summarize_language`,
`summarize_rows`, `checkpoint_metrics`, `measure_table`, `format_estimate`) and the functions that need
a model (`reference_logliks`, `measure_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from lidr_jax.formats.load import Model
from lidr_jax.methods.langid import DEFAULT_CANDIDATES, in_language
from lidr_jax.methods.lidr import chat_prompt
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.model.scoring import ScoringConfig, encode_answers, score_answers

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` prompts with its bootstrap interval [low, high] (nan for n = 0)."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_mean(
    values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> Estimate:
    """The mean of `values` (one per prompt) and its percentile bootstrap interval (module docstring)."""
    x = np.asarray(values, np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected one value per prompt, got an array of shape {x.shape}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level} and {resamples}")
    n = len(x)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = x[idx].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(x.mean()), float(low), float(high), n)


def paired_change(
    before: Sequence[float], after: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> Estimate:
    """Mean of after - before over the same prompts (aligned), with its bootstrap interval: the change
    is larger than noise when the interval excludes 0."""
    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if b.shape != a.shape:
        raise ValueError(f"before and after must be aligned per prompt, got {b.shape} and {a.shape}")
    return bootstrap_mean(a - b, seed=seed, resamples=resamples, level=level)


def summarize_language(
    answers: Sequence[str],
    lang: str,
    *,
    tokens: Sequence[int] | None = None,
    logliks: Sequence[float] | None = None,
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
) -> dict:
    """One language at one checkpoint, JSON-ready: {"in_language": Estimate dict, "mean_tokens",
    "mean_chars", "ref_loglik": Estimate dict (when `logliks` are given: per-token log-likelihood of each
    prompt's reference answer)}."""
    kw = {"seed": seed, "resamples": resamples, "level": level}
    out = {
        "in_language": bootstrap_mean(in_language(answers, lang, candidates).astype(np.float64), **kw).as_dict(),
        "mean_chars": float(np.mean([len(a) for a in answers])) if len(answers) else float("nan"),
        "mean_tokens": float(np.mean(tokens)) if tokens is not None and len(tokens) else float("nan"),
    }
    if logliks is not None:
        out["ref_loglik"] = bootstrap_mean(logliks, **kw).as_dict()
    return out


def summarize_rows(
    rows: Sequence[Mapping],
    *,
    skip_ids: Collection[str] = (),
    logliks: Mapping[str, Mapping[str, float]] | None = None,
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
) -> dict[str, dict]:
    """{lang: summarize_language(...)} from the check's answer rows ({"lang", "id", "outputs": [text, ...],
    "tokens": [n, ...]}; the first output of each row is measured). `skip_ids`: prompts left out of the
    answer measures (translation tasks); `logliks`: {lang: {id: per-token log-likelihood}} from
    `reference_logliks`, in the language's id order."""
    by_lang: dict[str, list[Mapping]] = {}
    for r in rows:
        by_lang.setdefault(r["lang"], []).append(r)
    out = {}
    for lang, mine in by_lang.items():
        kept = [r for r in mine if r["id"] not in skip_ids]
        lang_ll = None if logliks is None else logliks.get(lang)
        out[lang] = summarize_language(
            [r["outputs"][0] for r in kept],
            lang,
            tokens=[r["tokens"][0] for r in kept],
            logliks=None if lang_ll is None else list(lang_ll.values()),
            seed=seed,
            resamples=resamples,
            level=level,
            candidates=candidates,
        )
    return out


def in_language_by_id(
    rows: Sequence[Mapping], lang: str, *, skip_ids: Collection[str] = (), candidates=DEFAULT_CANDIDATES
) -> dict[str, float]:
    """{id: 1.0 or 0.0} for one language's answer rows: the per-prompt values `paired_change` compares."""
    mine = [r for r in rows if r["lang"] == lang and r["id"] not in skip_ids]
    flags = in_language([r["outputs"][0] for r in mine], lang, candidates)
    return {r["id"]: float(f) for r, f in zip(mine, flags)}


def format_estimate(est: Mapping | Estimate, digits: int = 2) -> str:
    """ "0.75 [0.62, 0.88]", or "-" for no prompts."""
    e = est if isinstance(est, Estimate) else Estimate(**est)
    if e.n == 0 or e.value != e.value:
        return "-"
    return f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"


# ---------------------------------------------------------------- one checkpoint, as the run report reads it


def checkpoint_metrics(
    rows: Sequence[Mapping],
    held_out: PromptSet,
    *,
    logliks: Mapping[str, Mapping[str, float]] | None = None,
    start_rows: Sequence[Mapping] | None = None,
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> dict[str, dict[str, float]]:
    """One checkpoint's measurement as flat {metric: {lang: value}}, the shape the run report's history
    and lidr_jax.eval.plots read: in_language, n, mean_tokens, mean_chars; with `logliks`, ref_loglik;
    with `start_rows` (the starting model's answers to the same prompts), change = the paired change of
    the in-language share since the start. in_language, ref_loglik and change come with _low and _high
    (the interval). Translation tasks of `held_out` are left out of the answer measures."""
    skip = held_out.translation_task
    kw = {"seed": seed, "resamples": resamples, "level": level}
    summary = summarize_rows(rows, skip_ids=skip, logliks=logliks, **kw)
    out: dict[str, dict[str, float]] = {}

    def put(metric: str, lang: str, est: Mapping) -> None:
        out.setdefault(metric, {})[lang] = est["value"]
        out.setdefault(f"{metric}_low", {})[lang] = est["low"]
        out.setdefault(f"{metric}_high", {})[lang] = est["high"]

    for lang, s in summary.items():
        put("in_language", lang, s["in_language"])
        out.setdefault("n", {})[lang] = float(s["in_language"]["n"])
        out.setdefault("mean_tokens", {})[lang] = s["mean_tokens"]
        out.setdefault("mean_chars", {})[lang] = s["mean_chars"]
        if "ref_loglik" in s:
            put("ref_loglik", lang, s["ref_loglik"])
        if start_rows is not None:
            now = in_language_by_id(rows, lang, skip_ids=skip)
            then = in_language_by_id(start_rows, lang, skip_ids=skip)
            ids = [pid for pid in now if pid in then]
            put("change", lang, paired_change([then[i] for i in ids], [now[i] for i in ids], **kw).as_dict())
    return out


def measure_table(
    history: Sequence[Mapping[str, Mapping[str, float]]], languages: Sequence[str], prefix: str = ""
) -> list[list[str]]:
    """Rows of a table (header first): per language, the in-language share, its change since k = 0 and the
    reference log-likelihood with their intervals, and the mean answer tokens, one column per checkpoint
    (k = position in `history`; metric keys as `checkpoint_metrics` names them, after `prefix`)."""

    def cell(h: Mapping, metric: str, lang: str, digits: int, sign: bool = False) -> str:
        v = h.get(prefix + metric, {}).get(lang)
        if v is None or v != v:
            return "-"
        low, high = h.get(f"{prefix}{metric}_low", {}).get(lang), h.get(f"{prefix}{metric}_high", {}).get(lang)
        f = f"{{:{'+' if sign else ''}.{digits}f}}"
        return f.format(v) + ("" if low is None else f" [{f.format(low)}, {f.format(high)}]")

    rows = [["lang", "measure"] + [f"k={k}" for k in range(len(history))]]
    for lang in languages:
        rows.append([lang, "in-language share"] + [cell(h, "in_language", lang, 2) for h in history])
        rows.append([lang, "change since k=0"] + [cell(h, "change", lang, 2, sign=True) for h in history])
        rows.append([lang, "ref. log-lik / token"] + [cell(h, "ref_loglik", lang, 3) for h in history])
        tokens = [h.get(prefix + "mean_tokens", {}).get(lang) for h in history]
        rows.append([lang, "mean answer tokens"] + ["-" if t is None or t != t else f"{t:.1f}" for t in tokens])
    return rows


# ---------------------------------------------------------------- with a model


def reference_logliks(
    model: Model,
    prompts: PromptSet,
    *,
    batch_size: int = 8,
    max_answer_tokens: int = 256,
    scoring: ScoringConfig | None = None,
    bucket_multiple: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """{lang: {id: mean per-token log-probability of the reference answer}} for every prompt of
    `prompts` that has a reference in that language. The prompt is the instruction as a user turn of
    the model's chat template (as the check asks it); the answer's tokens are what the assistant turn
    adds, end-of-turn included (lidr_jax.model.scoring.encode_answers), cut to `max_answer_tokens`,
    scored by lidr_jax.model.scoring.score_answers with `scoring`'s compute settings (default:
    ScoringConfig's), `batch_size` answers per forward, lengths bucketed by `bucket_multiple`."""
    scoring = (scoring or ScoringConfig()).replace(batch_size=batch_size)
    out: dict[str, dict[str, float]] = {}
    for lang in prompts.languages:
        refs = prompts.references.get(lang, {})
        ids = [pid for pid in prompts.ids if pid in refs]
        if not ids:
            continue
        by_id = prompts.by_id(lang)
        rows = encode_answers(model.tokenizer, [(chat_prompt(by_id[pid]), refs[pid]) for pid in ids], max_answer_tokens)
        total, _ = score_answers(
            model.params, model.config, rows, scoring, bucket_multiple=bucket_multiple, progress=progress
        )
        counts = rows.answer_lengths().astype(np.float64)
        out[lang] = {pid: float(t / n) for pid, t, n in zip(ids, total.astype(np.float64), counts)}
    return out


def measure_checkpoint(
    model: Model,
    held_out: PromptSet,
    rows: Sequence[Mapping],
    *,
    start_rows: Sequence[Mapping] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    scoring: ScoringConfig | None = None,
    bucket_multiple: int = 0,
) -> dict[str, dict[str, float]]:
    """`checkpoint_metrics` of the check's answer `rows`, with the reference log-likelihoods of `model`
    (`reference_logliks`)."""
    logliks = reference_logliks(
        model, held_out, batch_size=batch_size, scoring=scoring, bucket_multiple=bucket_multiple
    )
    return checkpoint_metrics(rows, held_out, logliks=logliks, start_rows=start_rows, seed=seed)
