"""The languages table and its unknown-code error."""

import pytest

from lidr_jax.methods.languages import (
    LANGUAGES,
    UnknownLanguageError,
    check_languages,
    get_language,
    language_name,
    native_name,
)


def test_table_covers_the_papers_languages():
    assert len(LANGUAGES) >= 30
    for code in ("en", "es", "ru", "de", "fr", "zh", "bn", "ja", "sw", "te", "th"):  # LIDR, ICR, MGSM
        assert code in LANGUAGES
    assert all(code == lang.code and len(code) == 2 and code.islower() for code, lang in LANGUAGES.items())
    assert len({lang.name for lang in LANGUAGES.values()}) == len(LANGUAGES)


def test_names():
    assert language_name("fr") == "French" and language_name("zh") == "Chinese" and language_name("en") == "English"
    assert native_name("de") == "Deutsch" and native_name("ru") == "русский"
    assert get_language("es").name == "Spanish"


@pytest.mark.parametrize(
    "query, hint",
    [
        ("fre", "fr (French)"),
        ("French", "fr (French)"),
        ("zh-CN", "zh (Chinese)"),
        ("EN", "en (English)"),
        ("Deutsch", "de (German)"),
        ("pt_BR", "pt (Portuguese)"),
    ],
)
def test_unknown_code_lists_close_matches(query, hint):
    with pytest.raises(UnknownLanguageError, match=f"unknown language code '{query}'") as err:
        language_name(query)
    assert "did you mean: " + hint in str(err.value)


def test_unknown_code_without_close_match_lists_all_codes():
    with pytest.raises(UnknownLanguageError, match=r"unknown language code 'qq'.*known codes: ar, bg, bn"):
        get_language("qq")
    assert issubclass(UnknownLanguageError, ValueError)


def test_check_languages():
    assert check_languages(["en", "fr"]) == ("en", "fr")
    with pytest.raises(ValueError, match="names fr more than once"):
        check_languages(["en", "fr", "fr"])
    with pytest.raises(UnknownLanguageError, match="'xx'"):
        check_languages(["en", "xx"])
