"""Languages by ISO 639-1 code: English names for prompts ("Translate ... into French"), native names.

Prompts name languages in English because the instruction-following of English-dominant models is
best in English; the native names are for reports and for users reading output in their language.
An unknown code is an error (raised before any model work) that lists the closest known codes and
names, so "fre", "english" or "zh-cn" get a useful hint instead of a KeyError.
"""

from __future__ import annotations

import difflib
import functools
import unicodedata
from dataclasses import dataclass


class UnknownLanguageError(ValueError):
    """A language code that is not in the table."""


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1, lower case
    name: str  # English name, as used in prompts
    native: str  # the language's own name for itself


_TABLE = (
    ("ar", "Arabic", "العربية"),
    ("bg", "Bulgarian", "български"),
    ("bn", "Bengali", "বাংলা"),
    ("ca", "Catalan", "català"),
    ("cs", "Czech", "čeština"),
    ("da", "Danish", "dansk"),
    ("de", "German", "Deutsch"),
    ("el", "Greek", "Ελληνικά"),
    ("en", "English", "English"),
    ("es", "Spanish", "español"),
    ("et", "Estonian", "eesti"),
    ("eu", "Basque", "euskara"),
    ("fa", "Persian", "فارسی"),
    ("fi", "Finnish", "suomi"),
    ("fr", "French", "français"),
    ("gu", "Gujarati", "ગુજરાતી"),
    ("he", "Hebrew", "עברית"),
    ("hi", "Hindi", "हिन्दी"),
    ("hr", "Croatian", "hrvatski"),
    ("hu", "Hungarian", "magyar"),
    ("id", "Indonesian", "Bahasa Indonesia"),
    ("it", "Italian", "italiano"),
    ("ja", "Japanese", "日本語"),
    ("kn", "Kannada", "ಕನ್ನಡ"),
    ("ko", "Korean", "한국어"),
    ("lt", "Lithuanian", "lietuvių"),
    ("lv", "Latvian", "latviešu"),
    ("ml", "Malayalam", "മലയാളം"),
    ("mr", "Marathi", "मराठी"),
    ("ms", "Malay", "Bahasa Melayu"),
    ("nl", "Dutch", "Nederlands"),
    ("no", "Norwegian", "norsk"),
    ("pl", "Polish", "polski"),
    ("pt", "Portuguese", "português"),
    ("ro", "Romanian", "română"),
    ("ru", "Russian", "русский"),
    ("sk", "Slovak", "slovenčina"),
    ("sl", "Slovenian", "slovenščina"),
    ("sr", "Serbian", "српски"),
    ("sv", "Swedish", "svenska"),
    ("sw", "Swahili", "Kiswahili"),
    ("ta", "Tamil", "தமிழ்"),
    ("te", "Telugu", "తెలుగు"),
    ("th", "Thai", "ไทย"),
    ("tl", "Tagalog", "Tagalog"),
    ("tr", "Turkish", "Türkçe"),
    ("uk", "Ukrainian", "українська"),
    ("ur", "Urdu", "اردو"),
    ("vi", "Vietnamese", "Tiếng Việt"),
    ("zh", "Chinese", "中文"),
)

LANGUAGES: dict[str, Language] = {code: Language(code, name, native) for code, name, native in _TABLE}


def _suggestions(query: str, n: int = 5) -> list[str]:
    """Known codes close to `query`, matched against codes, English names and native names."""
    q = query.strip().lower()
    base = q.replace("_", "-").split("-")[0]
    hits: list[str] = []
    # A region-tagged code ("zh-CN", "pt_BR") or an exact English/native name points at one code.
    for lang in LANGUAGES.values():
        if base == lang.code or q in (lang.name.lower(), lang.native.lower()):
            hits.append(lang.code)
    by_key = {}
    for lang in LANGUAGES.values():
        for key in (lang.code, lang.name.lower(), lang.native.lower()):
            by_key.setdefault(key, lang.code)
    for key in difflib.get_close_matches(q, list(by_key), n=2 * n, cutoff=0.6):
        hits.append(by_key[key])
    if len(q) >= 2:  # "fre" -> French, "germ" -> German: a prefix of the English name
        hits += [lang.code for lang in LANGUAGES.values() if lang.name.lower().startswith(q)]
    seen: list[str] = []
    for code in hits:
        if code not in seen:
            seen.append(code)
    return seen[:n]


def get_language(code: str) -> Language:
    """The table entry for an ISO 639-1 code (exact, lower case). Unknown codes raise UnknownLanguageError."""
    if isinstance(code, str) and code in LANGUAGES:
        return LANGUAGES[code]
    hints = _suggestions(str(code))
    hint = (
        "did you mean: " + ", ".join(f"{c} ({LANGUAGES[c].name})" for c in hints)
        if hints
        else "known codes: " + ", ".join(sorted(LANGUAGES))
    )
    raise UnknownLanguageError(
        f"unknown language code {code!r}: languages are named by lower-case ISO 639-1 codes; {hint}. "
        "To use another language, add it to lidr_jax/methods/languages.py."
    )


def language_name(code: str) -> str:
    """English name of a language, for prompts: language_name("fr") == "French"."""
    return get_language(code).name


def native_name(code: str) -> str:
    """The language's own name: native_name("de") == "Deutsch"."""
    return get_language(code).native


# Scripts a language is written in beyond the one of its native name (see `scripts`).
_EXTRA_SCRIPTS = {"ja": ("HIRAGANA", "KATAKANA"), "sr": ("LATIN",)}


def letter_script(ch: str) -> str:
    """The script of one letter as the first word of its Unicode name: "LATIN", "CYRILLIC", "CJK", "THAI"..."""
    return unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]


@functools.cache
def scripts(code: str) -> frozenset[str]:
    """The scripts `code` is written in: that of the letters of its native name (русский -> CYRILLIC,
    中文 -> CJK), plus kana for Japanese and Latin for Serbian."""
    native = {letter_script(ch) for ch in get_language(code).native if ch.isalpha()}
    return frozenset(native | set(_EXTRA_SCRIPTS.get(code, ())))


def check_languages(codes) -> tuple[str, ...]:
    """Validate a list of codes (unknown codes and duplicates raise); returns them as a tuple."""
    codes = tuple(codes)
    for code in codes:
        get_language(code)
    dupes = sorted({c for c in codes if codes.count(c) > 1})
    if dupes:
        raise ValueError(f"language list {list(codes)} names {', '.join(dupes)} more than once; list each once")
    return codes
