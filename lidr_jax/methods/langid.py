"""Language identification for off-target rates: is a model's answer in the language it was asked in?

Library: py3langid (a maintained fork of langid.py, Lui & Baldwin 2012): a naive-Bayes byte n-gram
model that ships inside the PyPI wheel, so it works offline and needs only numpy. Its raw label set
includes dialects and minor languages that take short texts from the big ones; the candidates are
restricted to the project's language table (lidr_jax.methods.languages), which is also what makes it
beat the alternatives tried. The accuracy measured on the evaluation data, the alternatives and why
they lost are in BENCHMARKS.md ("Language identification"; `python -m scripts.bench_langid`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import numpy as np

from lidr_jax.methods.languages import LANGUAGES

# The candidate set: the project's language table (every one of them is a py3langid label).
DEFAULT_CANDIDATES: tuple[str, ...] = tuple(sorted(LANGUAGES))

# Digits, punctuation and symbols: a text made only of these has no language. (They are kept for the
# classifier itself: stripping them measured worse, BENCHMARKS.md "Language identification".)
_NOISE_RE = re.compile(r"[\d\W_]+", re.UNICODE)


@functools.lru_cache(maxsize=8)
def _identifier(candidates: tuple[str, ...]):
    try:  # imported on first use: loading the identifier's model takes a moment
        from py3langid.langid import MODEL_FILE, LanguageIdentifier  # a runtime dependency, loaded on first use
    except ImportError as e:  # only a broken install gets here
        raise ImportError("language identification needs py3langid: pip install py3langid") from e
    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)
    unknown = sorted(set(candidates) - set(ident.nb_classes))
    if unknown:
        raise ValueError(f"py3langid cannot identify {unknown}; remove them from the candidate languages")
    ident.set_languages(list(candidates))
    return ident


def has_letters(text: str) -> bool:
    return bool(_NOISE_RE.sub("", text))


def detect_language(text: str, candidates: Sequence[str] = DEFAULT_CANDIDATES) -> str:
    """ISO 639-1 code of `text`'s language among `candidates`; "" when the text has no letters at all
    (an empty answer, or only numbers), which callers count as off-target."""
    if not has_letters(text):
        return ""
    return _identifier(tuple(sorted(set(candidates)))).classify(text)[0]


def in_language(texts: Iterable[str], lang: str, candidates: Sequence[str] = DEFAULT_CANDIDATES) -> np.ndarray:
    """[N] bool: whether each text is detected as `lang` (a text without letters is not). The one rule
    behind the off-target rates (`off_target_rate`) and the held-out in-language share (lidr_jax.eval)."""
    return np.array([detect_language(t, candidates) == lang for t in texts], bool)


def is_off_target(text: str, lang: str, candidates: Sequence[str] = DEFAULT_CANDIDATES) -> bool:
    """True when `text` is not (detectably) in language `lang`."""
    return not in_language([text], lang, candidates)[0]


def off_target_rate(texts: Iterable[str], lang: str, candidates: Sequence[str] = DEFAULT_CANDIDATES) -> float:
    """Share of `texts` not in `lang` (0.0 for no texts): the papers' off-target rate."""
    flags = in_language(texts, lang, candidates)
    return int((~flags).sum()) / flags.size if flags.size else 0.0
