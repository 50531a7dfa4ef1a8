"""Language identification on known sentences (paper languages and MGSM ones), and on shared data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lidr_jax.methods.langid import DEFAULT_CANDIDATES, detect_language, is_off_target, off_target_rate

SENTENCES = {
    "en": "The weather is lovely today, so we are going for a long walk in the park.",
    "es": "Hoy hace muy buen tiempo, así que vamos a dar un largo paseo por el parque.",
    "ru": "Сегодня прекрасная погода, поэтому мы идём на долгую прогулку в парк.",
    "de": "Heute ist das Wetter herrlich, deshalb machen wir einen langen Spaziergang im Park.",
    "fr": "Il fait très beau aujourd'hui, alors nous allons faire une longue promenade dans le parc.",
    "zh": "今天天气很好，所以我们要去公园散步很长时间。",
    "ja": "今日はとても良い天気なので、公園で長い散歩をするつもりです。",
    "bn": "আজ আবহাওয়া খুব সুন্দর, তাই আমরা পার্কে দীর্ঘ হাঁটতে যাচ্ছি।",
    "te": "ఈ రోజు వాతావరణం చాలా బాగుంది, కాబట్టి మేము పార్కులో చాలా సేపు నడకకు వెళ్తున్నాము.",
    "th": "วันนี้อากาศดีมาก เราจึงจะไปเดินเล่นในสวนสาธารณะนานๆ",
    "sw": "Leo hali ya hewa ni nzuri sana, kwa hiyo tunaenda kutembea kwa muda mrefu katika bustani.",
}

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_known_sentences(lang):
    assert detect_language(SENTENCES[lang]) == lang


def test_candidates_cover_mgsm_and_paper_languages():
    assert {"bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"} <= set(DEFAULT_CANDIDATES)


def test_math_answers_and_empty_text():
    assert detect_language("16 - 3 - 4 = 9, 9 * 2 = 18. Die Antwort ist also 18 Dollar.") == "de"
    assert detect_language("") == ""
    assert detect_language("  18 + 2 = 20 !!! ") == ""  # no letters: no language (counted off-target)
    assert is_off_target("", "en")
    assert not is_off_target(SENTENCES["fr"], "fr")
    assert off_target_rate([SENTENCES["fr"], SENTENCES["en"], "", SENTENCES["fr"]], "fr") == 0.5
    assert off_target_rate([], "fr") == 0.0


def test_restricted_candidates():
    assert detect_language(SENTENCES["es"], candidates=("en", "es")) == "es"
    with pytest.raises(ValueError, match=r"py3langid cannot identify \['xx'\]"):
        detect_language("hello there", candidates=("en", "xx"))


def test_shared_mgsm_questions():
    """Every MGSM language: at least 49 of the first 50 questions identified (measured: 50/50)."""
    if not (SHARED / "mgsm").is_dir():
        pytest.skip("../shared/data/mgsm is absent (shared data is only beside the repository checkout)")
    for lang in ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"):
        lines = (SHARED / "mgsm" / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines()[:50]
        hits = sum(detect_language(line.split("\t")[0]) == lang for line in lines)
        assert hits >= 49, (lang, hits)


def test_shared_x_alpacaeval():
    """First 100 instructions per language. Measured with py3langid 0.4: 100/100 for every language but
    Russian, 97/100 (short questions taken for Bulgarian/Ukrainian); one more miss is allowed so that a
    model update inside py3langid does not break the suite, a real regression still does."""
    if not (SHARED / "x-alpacaeval").is_dir():
        pytest.skip("../shared/data/x-alpacaeval is absent (shared data is only beside the repository checkout)")
    for lang in ("en", "es", "ru", "de", "fr", "zh"):
        rows = json.loads((SHARED / "x-alpacaeval" / f"{lang}.json").read_text(encoding="utf-8"))[:100]
        hits = sum(detect_language(r["instruction"]) == lang for r in rows)
        assert hits >= (97 if lang == "ru" else 100) - 1, (lang, hits)
