"""Pair quality filters: the language rule in Latin, Cyrillic, CJK, Arabic and Thai scripts, short and
letterless answers, code, copies; repetition; the order of reasons; the per-language table."""

import pytest

from lidr_jax.methods.filters import (
    DROP_REASONS,
    PairFilterConfig,
    PairTable,
    answer_reason,
    check_language,
    detected_language,
    format_table,
    pair_reason,
    repeated_ngram_share,
)
from lidr_jax.methods.languages import scripts

LONG = {
    "en": "The three primary colours are red, blue and yellow; mixing them gives the others.",
    "de": "Die drei Grundfarben sind Rot, Blau und Gelb; aus ihnen mischt man alle anderen.",
    "ru": "Три основных цвета: красный, синий и жёлтый; из них смешивают все остальные.",
    "zh": "三原色是红色、蓝色和黄色，其他颜色都可以由它们混合而成。",
    "ar": "الألوان الأساسية الثلاثة هي الأحمر والأزرق والأصفر، ومنها تمزج الألوان الأخرى.",
    "th": "สีหลักสามสีคือสีแดง สีน้ำเงิน และสีเหลือง ซึ่งนำมาผสมเป็นสีอื่นๆ ได้",
}


@pytest.mark.parametrize("lang", sorted(LONG))
def test_long_answers_pass_in_their_language_and_fail_in_another(lang):
    assert check_language(LONG[lang], lang)
    other = "en" if lang != "en" else "de"
    assert not check_language(LONG[lang], other)
    assert detected_language(LONG[lang]) == lang


def test_scripts_of_languages():
    assert scripts("de") == {"LATIN"} and scripts("ru") == {"CYRILLIC"} and scripts("zh") == {"CJK"}
    assert scripts("ar") == {"ARABIC"} and scripts("th") == {"THAI"}
    assert scripts("ja") == {"CJK", "HIRAGANA", "KATAKANA"} and scripts("sr") == {"CYRILLIC", "LATIN"}


def test_short_answers_are_judged_by_script_only():
    # Fewer than min_letters (10) letters: n-gram identification is unreliable, the script decides; a
    # short answer in the dominant language's script (Latin, for English) passes only in an English pair.
    assert not check_language("Rot.", "de") and not check_language("Red.", "de")  # cannot be told from English
    assert check_language("Red.", "en") and check_language("Yes", "en")
    assert not check_language("Red.", "ru") and check_language("Красный", "ru")
    assert check_language("红色", "zh") and not check_language("Rot", "zh")
    assert check_language("أحمر", "ar") and not check_language("Красный", "ar")
    assert check_language("สีแดง", "th") and not check_language("红色", "th")
    assert check_language("Rot.", "de", dominant="ru")  # with Russian dominant, Latin is not ambiguous
    assert not check_language("Красный", "ru", dominant="uk")  # Cyrillic under a Cyrillic dominant language
    assert detected_language("Rot.") == "short"
    # from 10 letters on, the identifier decides
    assert not check_language("Red and blue.", "de")  # 10 letters, English
    assert check_language("Rot und Blau.", "de")


def test_letterless_answers_and_code_pass():
    for text in ("42", "3 + 4 = 7", "  ", "**", "1. 2. 3."):
        assert check_language(text, "ru") and detected_language(text) == ""
    code = "```python\nfor colour in ['red', 'blue', 'yellow']:\n    print(colour)\n```"
    assert check_language(code, "fr") and detected_language(code) == ""
    assert check_language("`print(x)` 42", "ru")
    # prose around the code is what is checked
    assert not check_language("Here is the loop you asked for, in Python:\n" + code, "fr")


def test_a_copied_translation_fails_whatever_its_length():
    assert not check_language("Rot und Blau und Gelb", "de", source="Rot und Blau und Gelb")
    assert not check_language("Красный", "ru", source="Красный")  # even where the script would pass
    assert check_language("Rot und Blau und Gelb", "de", source="Red, blue and yellow")
    assert check_language("42", "de", source="42")  # no letters: nothing to translate


def test_repeated_ngram_share_hand_computed():
    assert repeated_ngram_share("a b a b a b", 2) == pytest.approx(3 / 5)  # 5 bigrams, 2 distinct
    assert repeated_ngram_share("one two three four", 4) == 0.0  # one 4-gram
    assert repeated_ngram_share("one two", 4) == 0.0  # none
    # unspaced script: characters; "哈哈哈哈哈哈" has 3 trigrams... 4 trigrams, 1 distinct
    assert repeated_ngram_share("哈哈哈哈哈哈", 3) == pytest.approx(3 / 4)


def test_reasons_in_order_and_switches():
    on = PairFilterConfig(length_cut=True, repetition=0.5, repetition_n=2)
    de = LONG["de"]
    assert pair_reason("", de, "de", on) == "empty" and pair_reason(de, " ", "de", on) == "empty"
    assert pair_reason(de, de + " ", "de", on) == "identical"
    assert pair_reason(LONG["en"], de, "de", on) == "language"  # the chosen is checked ...
    assert pair_reason(de, LONG["en"], "de", on) is None  # ... the rejected is not
    assert pair_reason(de, "x", "de", on, cut=True) == "length_cut"
    loop = "Die Farbe ist Rot. Die Farbe ist Rot. Die Farbe ist Rot."  # 11 bigrams, 4 distinct: 7/11 > 0.5
    assert pair_reason(loop, "x", "de", on) == "repetition"
    assert pair_reason(LONG["en"], de, "de", on, check_lang=False) is None  # translation-task pairs
    off = PairFilterConfig(language=False, empty=False, identical=False)  # the papers
    assert pair_reason("", "", "de", off) is None and pair_reason(LONG["en"], de, "de", off) is None
    assert PairFilterConfig().length_cut is False and PairFilterConfig().repetition == 0.0  # off by default
    assert answer_reason(loop, "de", PairFilterConfig()) is None
    with pytest.raises(ValueError, match=r"repetition must be >= 0 and < 1, got"):
        PairFilterConfig(repetition=1.5)


def test_table_counts_and_markdown():
    t = PairTable(["fr", "en"])
    for reason in (None, None, "language", "translation_failed", "language"):
        t.count("fr", reason)
    t.count("en", "identical")
    d = t.to_dict()
    assert d["fr"] == {
        "candidates": 5,
        "kept": 2,
        "dropped": {**dict.fromkeys(DROP_REASONS, 0), "language": 2, "translation_failed": 1},
    }
    assert d["en"]["candidates"] == 1 and d["en"]["kept"] == 0 and d["en"]["dropped"]["identical"] == 1
    assert format_table(d) == [
        "| language | candidates | kept | translation_failed | identical | language |",
        "|---|---|---|---|---|---|",
        "| fr | 5 | 2 | 1 | 0 | 2 |",
        "| en | 1 | 0 | 0 | 1 | 0 |",
    ]
    with pytest.raises(ValueError, match="unknown drop reason 'bad'"):
        t.count("fr", "bad")
