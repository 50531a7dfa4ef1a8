"""LIDR translation prompt/parse and pair construction on scripted generations (no model)."""

import pytest

from lidr_jax.methods.filters import DROP_REASONS, PairFilterConfig
from lidr_jax.methods.lidr import (
    LIDRPairConfig,
    LIDRPrompts,
    TranslationPrompt,
    build_pairs,
    chat_prompt,
    parse_translation,
    styled_prompts,
    translation_jobs,
    translation_request,
)
from lidr_jax.methods.prompt_sets import PromptSet
from lidr_jax.pipeline.pair_output import preference_pair

PAPER = PairFilterConfig(language=False, empty=False, identical=False)  # the papers filter nothing
IDS = ("a", "b", "c", "t")  # "t" is a translation-task prompt


def _prompts(languages=("en", "fr", "de")):
    instructions = {lang: tuple(f"x_{lang}[{pid}]" for pid in IDS) for lang in languages}
    return PromptSet(tuple(languages), IDS, instructions, translation_task=frozenset({"t"}))


NONE = dict.fromkeys(DROP_REASONS, 0)
GEN = {lang: {pid: f"y_{lang}[{pid}]" for pid in IDS} for lang in ("en", "fr", "de")}


def _fwd(lang, pid):
    return f"y_en->{lang}[{pid}]"


def _back(lang, pid):
    return f"y_{lang}->en[{pid}]"


# fr: en->fr fails for b, fr->en fails for c. de: everything succeeds; en->de of "t" is absent
# (translation-task prompts need no en->X translation).
TO_TARGET = {
    "fr": {"a": _fwd("fr", "a"), "b": None, "c": _fwd("fr", "c"), "t": _fwd("fr", "t")},
    "de": {"a": _fwd("de", "a"), "b": _fwd("de", "b"), "c": _fwd("de", "c")},
}
TO_DOMINANT = {
    "fr": {"a": _back("fr", "a"), "b": _back("fr", "b"), "c": None, "t": _back("fr", "t")},
    "de": {pid: _back("de", pid) for pid in IDS},
}


def _key(p):
    return (p.kind, p.language, p.id, p.prompt[-1]["content"], p.chosen, p.rejected, p.chosen_from, p.rejected_from)


def test_translation_request_and_parse_round_trip():
    messages, prefill = translation_request("Bonjour\nle monde", "de")
    assert prefill == "<translation>"
    assert messages == [{"role": "user", "content": messages[0]["content"]}]
    content = messages[0]["content"]
    assert "into German" in content and "<text>\nBonjour\nle monde\n</text>" in content
    assert content.endswith("</text>") and "</translation>" in content
    messages, _ = translation_request("hi", "fr", TranslationPrompt(system_prompt="You are a helpful assistant."))
    assert messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert "into French" in messages[1]["content"]
    # the model continues after the prefill
    assert parse_translation(" Hallo Welt \n</translation> trailing chatter") == "Hallo Welt"
    assert parse_translation("<translation>Hallo</translation>") == "Hallo"  # prefill echoed back
    assert parse_translation("Zeile 1\nZeile 2</translation>") == "Zeile 1\nZeile 2"


def test_parse_translation_failures():
    assert parse_translation("Hallo Welt, und dann wurde der Text abgeschnitt") is None  # no closing tag
    assert parse_translation("   </translation>") is None  # empty result
    assert parse_translation("") is None
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        translation_request("hi", "xx")


def test_target_and_dominant_pairs_all_directions_exact():
    pairs, stats = build_pairs(_prompts(), GEN, TO_TARGET, TO_DOMINANT, LIDRPairConfig(english_pairs="all"), PAPER)
    expected = [
        # target pairs: prompt x_X, chosen y_en->X, rejected y_X
        ("target", "fr", "a", "x_fr[a]", _fwd("fr", "a"), "y_fr[a]", "translation:en->fr", "generation:fr"),
        # translation task: chosen is the untranslated English answer
        ("target", "fr", "t", "x_fr[t]", "y_en[t]", "y_fr[t]", "generation:en", "generation:fr"),
        ("target", "de", "a", "x_de[a]", _fwd("de", "a"), "y_de[a]", "translation:en->de", "generation:de"),
        ("target", "de", "b", "x_de[b]", _fwd("de", "b"), "y_de[b]", "translation:en->de", "generation:de"),
        ("target", "de", "c", "x_de[c]", _fwd("de", "c"), "y_de[c]", "translation:en->de", "generation:de"),
        ("target", "de", "t", "x_de[t]", "y_en[t]", "y_de[t]", "generation:en", "generation:de"),
        # dominant pairs: prompt x_en, chosen y_en, rejected y_X->en
        ("dominant", "en", "a", "x_en[a]", "y_en[a]", _back("fr", "a"), "generation:en", "translation:fr->en"),
        ("dominant", "en", "t", "x_en[t]", "y_en[t]", _back("fr", "t"), "generation:en", "translation:fr->en"),
        ("dominant", "en", "a", "x_en[a]", "y_en[a]", _back("de", "a"), "generation:en", "translation:de->en"),
        ("dominant", "en", "b", "x_en[b]", "y_en[b]", _back("de", "b"), "generation:en", "translation:de->en"),
        ("dominant", "en", "c", "x_en[c]", "y_en[c]", _back("de", "c"), "generation:en", "translation:de->en"),
        ("dominant", "en", "t", "x_en[t]", "y_en[t]", _back("de", "t"), "generation:en", "translation:de->en"),
    ]
    assert [_key(p) for p in pairs] == expected
    assert all(p.prompt == [{"role": "user", "content": p.prompt[-1]["content"]}] for p in pairs)
    assert stats.target_pairs == {"fr": 2, "de": 4}
    assert stats.dominant_pairs == {"fr": 2, "de": 4}
    assert stats.failed == {"en->fr": 1, "fr->en": 1, "en->de": 0, "de->en": 0}
    assert stats.dropped == {"fr": ["b", "c"], "de": []}  # b: en->fr failed, c: fr->en failed
    assert stats.translation_task_pairs == 2
    assert stats.total == 12 and stats.to_dict()["total"] == 12
    assert stats.table["fr"] == {"candidates": 4, "kept": 2, "dropped": {**NONE, "translation_failed": 2}}
    assert stats.table["de"] == {"candidates": 4, "kept": 4, "dropped": NONE}
    assert stats.table["en"] == {"candidates": 6, "kept": 6, "dropped": NONE}
    assert all(
        p.meta["translator"] == ("none" if p.chosen_from == "generation:en" and p.kind == "target" else "policy")
        for p in pairs
    )


def test_english_pairs_sample_one_is_seeded_and_draws_only_valid_languages():
    settings = LIDRPairConfig(english_pairs="sample_one", seed=3)
    pairs, stats = build_pairs(_prompts(), GEN, TO_TARGET, TO_DOMINANT, settings, PAPER)
    english = [p for p in pairs if p.kind == "dominant"]
    assert sorted(p.id for p in english) == ["a", "b", "c", "t"]  # exactly one per prompt
    by_id = {p.id: p.rejected_from for p in english}
    # b and c have a valid pair only through de (fr failed), so de must be drawn for them
    assert by_id["b"] == "translation:de->en" and by_id["c"] == "translation:de->en"
    assert sum(stats.dominant_pairs.values()) == 4
    assert [p for p in pairs if p.kind == "target"] == [
        p
        for p in build_pairs(_prompts(), GEN, TO_TARGET, TO_DOMINANT, LIDRPairConfig("en", "all"), PAPER)[0]
        if p.kind == "target"
    ]
    again, _ = build_pairs(_prompts(), GEN, TO_TARGET, TO_DOMINANT, settings, PAPER)
    assert [_key(p) for p in again] == [_key(p) for p in pairs]
    # over many seeds both languages get drawn for the prompts where both are valid
    drawn = set()
    for seed in range(20):
        ps, _ = build_pairs(
            _prompts(), GEN, TO_TARGET, TO_DOMINANT, LIDRPairConfig(english_pairs="sample_one", seed=seed), PAPER
        )
        drawn |= {p.rejected_from for p in ps if p.kind == "dominant" and p.id == "a"}
    assert drawn == {"translation:fr->en", "translation:de->en"}


def test_identical_pairs_dropped_by_default_counted_and_kept_as_the_papers_do():
    to_target = {"fr": {pid: f"y_fr[{pid}]" for pid in IDS}}  # the "translation" equals y_fr
    to_dominant = {"fr": {pid: _back("fr", pid) for pid in IDS}}
    to_dominant["fr"]["b"] = "  y_en[b] "  # equal to y_en after stripping
    prompts = _prompts(("en", "fr"))
    no_language = PairFilterConfig(language=False)
    pairs, stats = build_pairs(prompts, GEN, to_target, to_dominant, filters=no_language)
    assert [(p.kind, p.id) for p in pairs] == [("target", "t"), ("dominant", "a"), ("dominant", "c"), ("dominant", "t")]
    assert stats.target_pairs == {"fr": 1} and stats.dominant_pairs == {"fr": 3}
    assert stats.table["fr"]["dropped"]["identical"] == 3  # a, b, c (t's chosen is y_en)
    assert stats.table["en"]["dropped"]["identical"] == 1
    pairs, stats = build_pairs(prompts, GEN, to_target, to_dominant, filters=PAPER)
    assert stats.target_pairs == {"fr": 4} and stats.dominant_pairs == {"fr": 4}


def test_system_prompt_and_trl_record():
    pairs, _ = build_pairs(
        _prompts(("en", "fr")), GEN, TO_TARGET, TO_DOMINANT, LIDRPairConfig(system_prompt="Be brief."), PAPER
    )
    rec = pairs[0].as_trl()
    assert rec["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x_fr[a]"}]
    assert rec["chosen"] == [{"role": "assistant", "content": _fwd("fr", "a")}]
    assert rec["rejected"] == [{"role": "assistant", "content": "y_fr[a]"}]
    assert (rec["id"], rec["language"], rec["kind"]) == ("a", "fr", "target")
    assert chat_prompt("q") == [{"role": "user", "content": "q"}]
    pp = preference_pair(pairs[0])
    assert (pp.prompt, pp.chosen, pp.rejected) == (rec["prompt"], rec["chosen"], rec["rejected"])
    assert pp.extra == {
        "id": "a",
        "language": "fr",
        "kind": "target",
        "chosen_from": "translation:en->fr",
        "rejected_from": "generation:fr",
        "meta": {"chosen_detected": "short", "rejected_detected": "short", "translator": "policy"},
    }


def test_incomplete_stage_outputs_raise():
    with pytest.raises(ValueError, match=r"no fr generation for 1 prompt id\(s\) \(c\)"):
        gen = {**GEN, "fr": {k: v for k, v in GEN["fr"].items() if k != "c"}}
        build_pairs(_prompts(), gen, TO_TARGET, TO_DOMINANT)
    with pytest.raises(ValueError, match=r"no en->de translation result for 1 prompt id\(s\) \(b\)"):
        to_target = {**TO_TARGET, "de": {"a": "x", "c": "y"}}
        build_pairs(_prompts(), GEN, to_target, TO_DOMINANT)
    with pytest.raises(ValueError, match=r"no de->en translation result .* \(t\)"):
        to_dominant = {**TO_DOMINANT, "de": dict.fromkeys("abc", "x")}
        build_pairs(_prompts(), GEN, TO_TARGET, to_dominant)
    with pytest.raises(ValueError, match="dominant language 'en' is not among"):
        build_pairs(_prompts(("fr", "de")), GEN, TO_TARGET, TO_DOMINANT)
    with pytest.raises(ValueError, match="english_pairs must be one of"):
        LIDRPairConfig(english_pairs="first")


def test_translation_jobs_skip_en_to_x_for_translation_tasks():
    jobs = translation_jobs(_prompts(), GEN)
    assert [(j.direction, j.id, j.text) for j in jobs] == [
        ("en->fr", "a", "y_en[a]"),
        ("en->fr", "b", "y_en[b]"),
        ("en->fr", "c", "y_en[c]"),
        ("fr->en", "a", "y_fr[a]"),
        ("fr->en", "b", "y_fr[b]"),
        ("fr->en", "c", "y_fr[c]"),
        ("fr->en", "t", "y_fr[t]"),
        ("en->de", "a", "y_en[a]"),
        ("en->de", "b", "y_en[b]"),
        ("en->de", "c", "y_en[c]"),
        ("de->en", "a", "y_de[a]"),
        ("de->en", "b", "y_de[b]"),
        ("de->en", "c", "y_de[c]"),
        ("de->en", "t", "y_de[t]"),
    ]


def test_english_pairs_last_keeps_only_the_last_target_languages_back_translations():
    # targets in order fr, de: "last" is de; every prompt's de translations succeeded (a, b, c, t)
    pairs, stats = build_pairs(_prompts(), GEN, TO_TARGET, TO_DOMINANT, LIDRPairConfig(english_pairs="last"), PAPER)
    english = [p for p in pairs if p.kind == "dominant"]
    assert [(p.id, p.rejected_from) for p in english] == [(pid, "translation:de->en") for pid in ("a", "b", "c", "t")]
    assert stats.dominant_pairs == {"fr": 0, "de": 4}
    # a prompt whose last-language translation failed gets no English pair (as in the authors' script)
    back = {**TO_DOMINANT, "de": {**TO_DOMINANT["de"], "b": None}}
    pairs, _ = build_pairs(_prompts(), GEN, TO_TARGET, back, LIDRPairConfig(english_pairs="last"), PAPER)
    assert [p.id for p in pairs if p.kind == "dominant"] == ["a", "c", "t"]


GERMAN = "Die drei Grundfarben sind Rot, Blau und Gelb."
FRENCH = "Les trois couleurs primaires sont le rouge, le bleu et le jaune."
ENGLISH = "The three primary colours are red, blue and yellow."


def test_language_filter_counts_every_reason_in_the_table():
    ids = ("a", "b", "c", "d", "t")
    prompts = PromptSet(
        ("en", "de"), ids, {lang: tuple(f"x_{lang}[{p}]" for p in ids) for lang in ("en", "de")}, frozenset({"t"})
    )
    gens = {
        "en": {"a": ENGLISH, "b": ENGLISH + " Red.", "c": "Red", "d": ENGLISH + " Yes.", "t": FRENCH},
        "de": {"a": "Rot.", "b": GERMAN, "c": "Rot", "d": "Farben: Rot.", "t": "Rot."},
    }
    to_target = {"de": {"a": GERMAN, "b": ENGLISH, "c": "Red", "d": None}}  # b: an English "translation"; c: a copy
    to_dominant = {"de": {"a": ENGLISH + " Really.", "b": ENGLISH + " Blue.", "c": "Red", "d": ENGLISH, "t": ENGLISH}}
    pairs, stats = build_pairs(prompts, gens, to_target, to_dominant, LIDRPairConfig(english_pairs="all"))
    assert [(p.kind, p.id) for p in pairs] == [
        ("target", "a"),
        ("target", "t"),
        ("dominant", "a"),
        ("dominant", "b"),
        ("dominant", "t"),
    ]
    # de: a kept; b English chosen; c copied "Red"; d failed translation; t a translation task (chosen y_en
    # in French, as its instruction asks: not language-checked). en: a, b kept; c identical ("Red" ==
    # "Red"); t's English pair, whose chosen is the French y_en, is not language-checked either.
    assert stats.table["de"] == {
        "candidates": 5,
        "kept": 2,
        "dropped": {**NONE, "translation_failed": 1, "language": 2},
    }
    assert stats.table["en"] == {"candidates": 4, "kept": 3, "dropped": {**NONE, "identical": 1}}
    assert pairs[0].meta == {"chosen_detected": "de", "rejected_detected": "short", "translator": "policy"}
    assert pairs[1].meta["translator"] == "none" and pairs[1].meta["chosen_detected"] == "fr"
    # language_translation_tasks: the check covers translation tasks too; both of t's pairs fail it.
    strict = PairFilterConfig(language_translation_tasks=True)
    pairs, stats = build_pairs(prompts, gens, to_target, to_dominant, LIDRPairConfig(english_pairs="all"), strict)
    assert [(p.kind, p.id) for p in pairs] == [("target", "a"), ("dominant", "a"), ("dominant", "b")]
    assert stats.table["de"]["dropped"] == {**NONE, "translation_failed": 1, "language": 3}
    assert stats.table["en"]["dropped"] == {**NONE, "identical": 1, "language": 1}


def test_prompt_texts_are_settings():
    prompt = TranslationPrompt(
        template="Render {text} in {language}.", result_open="[", result_close="]", prefill="[", system_prompt="S"
    )
    messages, prefill = translation_request("Hi", "fr", prompt)
    assert messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Render Hi in French."}]
    assert prefill == "["
    assert parse_translation("Salut]", prompt) == "Salut"
    with pytest.raises(ValueError, match=r"translation template: .*\['\{txt\}'\] is not; \['\{text\}'\] is required"):
        TranslationPrompt(template="Translate {txt}")
    # the arithmetic style wraps every instruction in its own language's request, for generation and pairs
    style = LIDRPrompts(style="arithmetic", arithmetic_template="{instruction} (answer in {language})")
    wrapped = styled_prompts(_prompts(("en", "fr")), style)
    assert (
        wrapped.by_id("fr")["a"] == "x_fr[a] (answer in French)"
        and wrapped.by_id("en")["a"] == "x_en[a] (answer in English)"
    )
    assert styled_prompts(_prompts(("en", "fr")), LIDRPrompts()) == _prompts(("en", "fr"))
    with pytest.raises(ValueError, match=r"style must be one of \['plain', 'arithmetic'\]"):
        LIDRPrompts(style="math")


def test_unclosed_translations_for_the_icr_baseline():
    # the ICR authors' translate-the-answer baseline keeps an unclosed translation; an empty one is invalid
    assert parse_translation("Hello world, and then the text was cu", keep_unclosed=True) == (
        "Hello world, and then the text was cu"
    )
    assert parse_translation("<translation>Hello</translation>", keep_unclosed=True) == "Hello"
    assert parse_translation("   ", keep_unclosed=True) is None
    assert parse_translation("Hello world", keep_unclosed=False) is None  # LIDR: a failure


def test_back_translation_and_translation_task_filters():
    """back_translation: a dominant pair whose rejected back-translation is not English is dropped
    (counted as language); translation_tasks=False: a translation task's target pair is dropped
    (counted as translation_task). Both off by default keeps the papers' pairs."""
    ids = ("a", "b", "t")
    prompts = PromptSet(
        ("en", "de"), ids, {lang: tuple(f"x_{lang}[{p}]" for p in ids) for lang in ("en", "de")}, frozenset({"t"})
    )
    gens = {"en": {p: ENGLISH + f" ({p})" for p in ids}, "de": {p: GERMAN + f" ({p})" for p in ids}}
    to_target = {"de": {"a": GERMAN, "b": GERMAN + " Danke."}}
    to_dominant = {"de": {"a": ENGLISH, "b": GERMAN, "t": ENGLISH + " Sure."}}  # b stayed German
    everything = LIDRPairConfig(english_pairs="all")
    pairs, stats = build_pairs(prompts, gens, to_target, to_dominant, everything)
    assert [(p.kind, p.id) for p in pairs] == [("target", "a"), ("target", "b"), ("target", "t")] + [
        ("dominant", p) for p in ids
    ]
    filters = PairFilterConfig(back_translation=True, translation_tasks=False)
    pairs, stats = build_pairs(prompts, gens, to_target, to_dominant, everything, filters)
    assert [(p.kind, p.id) for p in pairs] == [("target", "a"), ("target", "b"), ("dominant", "a"), ("dominant", "t")]
    assert stats.table["de"] == {"candidates": 3, "kept": 2, "dropped": {**NONE, "translation_task": 1}}
    assert stats.table["en"] == {"candidates": 3, "kept": 2, "dropped": {**NONE, "language": 1}}
    assert stats.translation_task_pairs == 0
