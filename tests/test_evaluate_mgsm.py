"""MGSM without a model: number extraction, TSV reading, prompts, scoring of scripted outputs."""

from __future__ import annotations

import pytest

from lidr_jax.eval.mgsm import (
    ANSWER_WORD,
    MGSM_LANGUAGES,
    ZERO_SHOT_TEMPLATES,
    MgsmItem,
    extract_number,
    find_numbers,
    mgsm_messages,
    parse_number,
    read_mgsm,
    score_mgsm,
)

EXTRACTION_CASES = [
    # plain and marker forms
    ("Answer: 18", 18),
    ("She earns 9 * 2 = 18 dollars.\nAnswer: 18", 18),
    ("The answer is 42.", 42),
    ("**Answer:** $70,000", 70000),
    ("Step 1: 16 - 3 - 4 = 9. Step 2: 9 * 2 = 18", 18),  # no marker: last number
    ("Answer: 18 dollars, because 9 eggs cost 2 each", 18),  # first number after the marker
    ("I think Answer: 5 ... no wait. Answer: 7", 7),  # the last marker wins
    ("#### 1234", 1234),
    ("So the result is \\boxed{25}.", 25),
    ("Answer: -5", -5),
    ("5-3=2", 2),  # a hyphen after a digit is not a minus sign
    # thousands separators and decimals
    ("Answer: 1,234,567", 1234567),
    ("Antwort: 1.234", 1234),
    ("Antwort: 1.234,5 Euro", 1234.5),
    ("Answer: 1,234.5", 1234.5),
    ("Réponse : 1 234 €", 1234),
    ("Réponse : 12\u202f500,75 €", 12500.75),
    ("Antwort: 1'000'000", 1000000),
    ("Respuesta: 3,5 kg", 3.5),
    ("Answer: 2.50", 2.5),
    ("Answer: 0,125", 0.125),
    ("Answer: $18.00.", 18),
    ("Ответ: 114,200 рублей.", 114200),
    ("numbers 1,2,3", 3),  # bad grouping: separate numbers, the last one wins
    # currency and trailing text
    ("Jibu: Sh. 450 kwa siku.", 450),
    ("答案：18美元。", 18),
    ("她每天赚18美元", 18),
    ("Answer: €20", 20),
    # non-Latin digits
    ("উত্তর: ১৮", 18),
    ("উত্তর: ৭০,০০০ ডলার", 70000),
    ("సమాధానం: ౧౮", 18),
    ("คำตอบ: ๑๘ บาท", 18),
    ("答え：１８", 18),
    ("答案：１，２３４", 1234),
    ("الجواب ٣٤٥", 345),
    ("الجواب ١٢٫٥", 12.5),
    ("Answer: १८", 18),  # Devanagari
    ("Answer: −7", -7),  # Unicode minus
    # nothing to find
    ("I do not know.", None),
    ("", None),
    ("The area is 5 m²", 5),  # a superscript is not a digit of its own
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_number(text, expected):
    got = extract_number(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-9)


def test_enough_extraction_cases():
    assert len(EXTRACTION_CASES) >= 30


@pytest.mark.parametrize(
    "token,expected",
    [("2,125", 2125), ("2.125", 2125), ("2,12", 2.12), ("1.234,56", 1234.56), ("12,34,567", None), ("1,2.3,4", None)],
)
def test_parse_number(token, expected):
    assert parse_number(token) == expected


def test_find_numbers_in_order():
    assert find_numbers("from 3 to 4,5 then 1 000 and -2") == [3, 4.5, 1000, -2]


def test_read_mgsm(tmp_path):
    path = tmp_path / "mgsm_xx.tsv"
    path.write_text("Q one?\t18\nQ two?\t114,200\n\nQ three?\t3\n", encoding="utf-8")
    assert read_mgsm(path) == [MgsmItem("Q one?", 18.0), MgsmItem("Q two?", 114200.0), MgsmItem("Q three?", 3.0)]
    assert read_mgsm(path, limit=2) == read_mgsm(path)[:2]
    path.write_text("Q one?\t18\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mgsm_xx.tsv:2: expected 'question<TAB>number'"):
        read_mgsm(path)
    with pytest.raises(FileNotFoundError, match="point the data path"):
        read_mgsm(tmp_path / "missing.tsv")


def test_prompts_every_language():
    for lang in MGSM_LANGUAGES:
        assert ANSWER_WORD[lang] in ZERO_SHOT_TEMPLATES[lang]
        # the instruction's own answer line must be read back by the extractor
        assert extract_number(f"...\n{ANSWER_WORD[lang]}: 1234") == 1234
    shots = [MgsmItem("Wie viel ist 2+2?", 4.0), MgsmItem("Und 3+3?", 6.0)]
    msgs = mgsm_messages("Was ist 5+5?", "de", shots)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"] == "Antwort: 4"
    assert msgs[-1]["content"].endswith("Was ist 5+5?")
    assert msgs[-1]["content"].startswith("Löse")
    with pytest.raises(ValueError, match="no MGSM instruction for language 'xx'"):
        mgsm_messages("q", "xx")


def test_score_mgsm_scripted():
    items = [MgsmItem(f"q{i}", float(a)) for i, a in enumerate([18, 3, 70000, 5, 12])]
    outputs = [
        "Die Enten legen 16 Eier. Sie verkauft 9 Eier für je 2 Dollar.\nAntwort: 18",  # right, German
        "Es werden zwei Rollen blauer Faser und eine Rolle weißer Faser benötigt.\nAntwort: 4",  # wrong, German
        "He bought the house and repaired it, so the profit is 70,000 dollars.\nAnswer: 70,000",  # right, English
        "",  # empty: wrong and off-target
        "Sie hat am Ende zwölf Äpfel, also insgesamt 12 Stück.\nAntwort: 12",  # right, German
    ]
    s = score_mgsm(items, outputs, "de")
    assert s["n"] == 5
    assert s["accuracy"] == 3 / 5
    assert s["off_target_rate"] == 2 / 5
    assert [r["correct"] for r in s["records"]] == [True, False, True, False, True]
    assert [r["detected_language"] for r in s["records"]] == ["de", "de", "en", "", "de"]
    assert [r["prediction"] for r in s["records"]] == [18, 4, 70000, None, 12]
    with pytest.raises(ValueError, match="5 MGSM items but 4 outputs"):
        score_mgsm(items, outputs[:4], "de")
