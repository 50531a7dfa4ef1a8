"""Quality filters on preference pairs, one settings group for LIDR and ICR, every drop counted.

Why: a small model's self-translation often copies the English text, so a German pair's "chosen"
answer is English and DPO trains the model to answer German prompts in English (on the default run
before these filters, most target pairs' chosen answers were not in the pair's language: BENCHMARKS.md,
"Language identification").
The papers add no filter; `PairFilterConfig(language=False, empty=False, identical=False)` reproduces
them.

Filters, in the order a pair is checked (the first that fails is the pair's reason):
- `empty`: the chosen or the rejected answer is empty (whitespace only).
- `identical`: chosen equals rejected after stripping whitespace (a zero DPO gradient).
- `language`: the chosen answer is not in the pair's language. Only the chosen answer is checked:
  a wrong-language rejected answer is exactly what the method penalises. The rule (`check_language`):
    1. code is set aside first: fenced blocks (```...```) and inline `code` are removed;
    2. what is left has no letters (numbers, symbols, code only): it PASSES, as nothing says which
       language it is in;
    3. fewer than `min_letters` letters (a word or two: n-gram identification is unreliable there,
       py3langid calls "Red" Arabic): only the script is checked (lidr_jax.methods.languages.scripts).
       It passes when its letters are in the pair language's script(s), except when that script is
       also the dominant language's and the pair is not in the dominant language: a short Latin
       answer in a German pair cannot be told apart from English, whose leakage is what this filter
       guards against, so it fails ("Red", and also a genuine "Rot"); a short Cyrillic answer passes
       in a Russian pair and fails in a German one; a short Latin answer passes in an English pair;
    4. otherwise the identified language (lidr_jax.methods.langid, among the project's 50 languages)
       must be the pair's language;
    and, whatever the length, a translation identical to the text it translates (with letters) fails:
    the model copied instead of translating (the "Red" of a German pair).
- `back_translation` (off by default): a dominant pair's rejected answer, the back-translation of a
  target answer into the dominant language, must be in the dominant language (the rule above). A
  small model often leaves it in the source language; such a pair then trains "do not write French"
  rather than "prefer the better English answer", and pushes the policy away from the very languages
  LIDR is meant to improve (counted as `language`).
- `translation_tasks` (on by default, as in the papers): keep target pairs of prompts flagged as
  translation tasks, whose chosen answer is the untranslated dominant-language answer. Off drops them
  (counted as `translation_task`): a small model answers a translation task with prose in the dominant
  language, and such a pair trains it to answer a German prompt in English.
- `language_translation_tasks` (off by default): the `language` filter's scope. A translation task's
  answer is in the language its instruction asks for, not the prompt's, so by default the language
  check skips the chosen answers of translation-task prompts, in target and dominant-language pairs
  alike (the authors keep every such pair: their code has no filter). On checks them too: a dominant
  pair whose chosen answer is a French translation is then dropped as `language`.
- `length_cut` (off by default): the chosen answer, or the answer it was translated from, stopped at
  the token limit.
- `repetition` (off by default: 0): the chosen answer's repeated n-gram share is above the threshold
  (`repeated_ngram_share`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from lidr_jax.methods.langid import DEFAULT_CANDIDATES, detect_language
from lidr_jax.methods.languages import get_language, letter_script, scripts
from lidr_jax.settings import check_settings, setting

# Columns of the per-language pair table, in order. prompt_cut: a prompt the pair needs (a generation,
# a translation request, ICR's sampling prompt) was longer than the stage's prompt limit, so it was
# not generated (never cut: lidr_jax.sampling.sampler); translation_failed: LIDR, a needed translation
# failed; no_pair: ICR, the samples give no pair (fewer than two usable, or all scored the same);
# upper_bound: ICR, every choosable sample scored at or above the bound.
DROP_REASONS = (
    "prompt_cut",
    "translation_failed",
    "translation_task",
    "no_pair",
    "upper_bound",
    "empty",
    "identical",
    "language",
    "length_cut",
    "repetition",
)

_FENCED = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_INLINE = re.compile(r"`[^`\n]*`")


@dataclasses.dataclass(frozen=True)
class PairFilterConfig:
    """Which pair filters run (module docstring). `language: false`, `empty: false` and
    `identical: false` reproduce the papers, which filter nothing."""

    language: bool = setting(True, "the chosen answer must be in the pair's language")
    min_letters: int = setting(10, "below this many letters only the script is checked", ge=1)
    empty: bool = setting(True, "drop pairs with an empty chosen or rejected answer")
    identical: bool = setting(True, "drop pairs whose chosen equals the rejected")
    back_translation: bool = setting(
        False, "a dominant pair's rejected back-translation must be in the dominant language"
    )
    translation_tasks: bool = setting(
        True, "keep target pairs of translation-task prompts (chosen: the untranslated answer)"
    )
    language_translation_tasks: bool = setting(
        False, "the language check also covers translation-task prompts' answers"
    )
    length_cut: bool = setting(False, "drop pairs whose chosen (or its source) stopped at the token limit")
    repetition: float = setting(
        0.0, "drop pairs whose chosen has a repeated n-gram share above this; 0 = off", ge=0, lt=1
    )
    repetition_n: int = setting(4, "n of the n-grams (words; characters for unspaced scripts)", ge=1)

    def __post_init__(self):
        check_settings(self)


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code spans."""
    return _INLINE.sub(" ", _FENCED.sub(" ", text))


def detected_language(text: str, min_letters: int = 10) -> str:
    """What the provenance records for `text`: its identified language, "" without letters (after
    code is set aside), or "short" below `min_letters` letters (too few to identify)."""
    rest = prose(text)
    n = sum(ch.isalpha() for ch in rest)
    if n == 0:
        return ""
    if n < min_letters:
        return "short"
    return detect_language(rest, DEFAULT_CANDIDATES)


def check_language(
    text: str, lang: str, min_letters: int = 10, source: str | None = None, dominant: str = "en"
) -> bool:
    """True when `text` may stand as an answer in `lang` (the rule of the module docstring).
    `source`: the text `text` was translated from, if it is a translation; `dominant`: the run's
    dominant language."""
    get_language(lang)
    rest = prose(text)
    letters = [ch for ch in rest if ch.isalpha()]
    if not letters:
        return True
    if source is not None and prose(source).strip() == rest.strip():
        return False
    if len(letters) < min_letters:
        allowed = set(scripts(lang)) - (set() if lang == dominant else set(scripts(dominant)))
        return all(letter_script(ch) in allowed for ch in letters)
    return detect_language(rest, DEFAULT_CANDIDATES) == lang


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """(n-grams − distinct n-grams) / n-grams over the text's words, or over its characters (spaces
    removed) when it has fewer than two words per 20 characters (Chinese, Japanese, Thai). 0.0 when
    there is no n-gram. "a b a b a b" with n = 2: 5 bigrams, 2 distinct: 0.6."""
    words = text.split()
    joined = "".join(words)
    units = list(joined) if len(words) < 2 * max(1, len(joined) // 20) else words
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def answer_reason(
    text: str,
    lang: str,
    cfg: PairFilterConfig,
    *,
    cut: bool = False,
    source: str | None = None,
    check_lang: bool = True,
    dominant: str = "en",
) -> str | None:
    """Why `text` cannot be a chosen answer in `lang` ("empty", "language", "length_cut",
    "repetition"), or None. `check_lang` False skips the language check (translation-task pairs,
    whose answer's language is set by the instruction)."""
    if cfg.empty and not text.strip():
        return "empty"
    if cfg.language and check_lang and not check_language(text, lang, cfg.min_letters, source, dominant):
        return "language"
    if cfg.length_cut and cut:
        return "length_cut"
    if cfg.repetition > 0 and repeated_ngram_share(text, cfg.repetition_n) > cfg.repetition:
        return "repetition"
    return None


def pair_reason(chosen: str, rejected: str, lang: str, cfg: PairFilterConfig, **checks) -> str | None:
    """Why a pair is dropped (the first failing filter of the module docstring's order), or None.
    `checks`: `answer_reason`'s keywords for the chosen answer (cut, source, check_lang, dominant)."""
    if cfg.empty and not (chosen.strip() and rejected.strip()):
        return "empty"
    if cfg.identical and chosen.strip() == rejected.strip():
        return "identical"
    return answer_reason(chosen, lang, cfg, **checks)


def provenance(chosen: str, rejected: str, cfg: PairFilterConfig) -> dict[str, str]:
    """The detected languages a kept pair records (`detected_language`)."""
    return {
        "chosen_detected": detected_language(chosen, cfg.min_letters),
        "rejected_detected": detected_language(rejected, cfg.min_letters),
    }


class PairTable:
    """Per-language counts: candidates, kept, and dropped by reason (`DROP_REASONS`)."""

    def __init__(self, languages=()):
        self.rows: dict[str, dict] = {}
        for lang in languages:
            self._row(lang)

    def _row(self, lang: str) -> dict:
        return self.rows.setdefault(lang, {"candidates": 0, "kept": 0, "dropped": Counter()})

    def count(self, lang: str, reason: str | None) -> None:
        """One candidate pair of `lang`: kept (reason None) or dropped for `reason`."""
        if reason is not None and reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; known: {DROP_REASONS}")
        row = self._row(lang)
        row["candidates"] += 1
        if reason is None:
            row["kept"] += 1
        else:
            row["dropped"][reason] += 1

    def to_dict(self) -> dict[str, dict]:
        """{lang: {"candidates", "kept", "dropped": {reason: n}}} with every reason present, in order."""
        return {
            lang: {
                "candidates": row["candidates"],
                "kept": row["kept"],
                "dropped": {reason: row["dropped"].get(reason, 0) for reason in DROP_REASONS},
            }
            for lang, row in self.rows.items()
        }


def format_table(table: dict[str, dict]) -> list[str]:
    """A Markdown table of a `PairTable.to_dict()`: one row per language, one column per reason that
    dropped anything (all reasons when none did)."""
    used = [r for r in DROP_REASONS if any(row["dropped"].get(r, 0) for row in table.values())]
    header = ["language", "candidates", "kept", *(used or ["dropped"])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for lang, row in table.items():
        cells = [lang, str(row["candidates"]), str(row["kept"])]
        cells += [str(row["dropped"].get(r, 0)) for r in used] if used else ["0"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
