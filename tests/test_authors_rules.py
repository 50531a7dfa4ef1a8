"""With every option at the authors' value, LIDR and ICR pair builds on fixed samples give the pairs
the authors' rules give (docs/reproducing.md names each option and the authors' file). Every expected
pair below is worked out by hand from those rules, not by running the project's code."""

from lidr_jax.methods.filters import DROP_REASONS, PairFilterConfig
from lidr_jax.methods.icr import ICRSelectionConfig, icr_pairs
from lidr_jax.methods.lidr import LIDRPairConfig, build_pairs
from lidr_jax.methods.prompt_sets import PromptSet

AUTHORS_FILTERS = PairFilterConfig(language=False, empty=False, identical=False)  # their code filters nothing


def test_lidr_pairs_follow_the_authors_rules():
    """utils/preprocess_dpo_format_dataset.py, for X in (fr, de): a prompt id gives pairs for X when
    neither translation failed; target pair (x_X, y_en->X, y_X), or for a translation task
    (x_X, y_en, y_X); English pair (x_en, y_en, y_X->en), the English file rewritten for every X so
    only the last X's (de) survive; nothing else is checked, so the empty and the identical pairs stay."""
    ids = ("a", "b", "t", "e")  # t: a translation task; e: an empty back-translation, an identical pair
    langs = ("en", "fr", "de")
    prompts = PromptSet(langs, ids, {lg: tuple(f"x_{lg}[{p}]" for p in ids) for lg in langs}, frozenset({"t"}))
    gens = {lg: {p: f"y_{lg}[{p}]" for p in ids} for lg in langs}
    gens["de"]["e"] = "same"
    to_target = {
        "fr": {"a": "y_en->fr[a]", "b": None, "e": "y_en->fr[e]"},  # en->fr of b failed
        "de": {"a": "y_en->de[a]", "b": "y_en->de[b]", "e": "same"},
    }
    to_dominant = {
        "fr": {"a": "y_fr->en[a]", "b": "y_fr->en[b]", "t": "y_fr->en[t]", "e": "y_fr->en[e]"},
        "de": {"a": "y_de->en[a]", "b": "y_de->en[b]", "t": "y_de->en[t]", "e": ""},
    }
    settings = LIDRPairConfig(english_pairs="last")
    pairs, stats = build_pairs(prompts, gens, to_target, to_dominant, settings, AUTHORS_FILTERS)
    got = sorted((p.language, p.id, p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs)
    expected = sorted(
        [
            ("fr", "a", "x_fr[a]", "y_en->fr[a]", "y_fr[a]"),
            ("fr", "t", "x_fr[t]", "y_en[t]", "y_fr[t]"),
            ("fr", "e", "x_fr[e]", "y_en->fr[e]", "y_fr[e]"),
            ("de", "a", "x_de[a]", "y_en->de[a]", "y_de[a]"),
            ("de", "b", "x_de[b]", "y_en->de[b]", "y_de[b]"),
            ("de", "t", "x_de[t]", "y_en[t]", "y_de[t]"),
            ("de", "e", "x_de[e]", "same", "same"),
            ("en", "a", "x_en[a]", "y_en[a]", "y_de->en[a]"),
            ("en", "b", "x_en[b]", "y_en[b]", "y_de->en[b]"),
            ("en", "t", "x_en[t]", "y_en[t]", "y_de->en[t]"),
            ("en", "e", "x_en[e]", "y_en[e]", ""),
        ]
    )
    assert got == expected
    assert all(p.prompt == [{"role": "user", "content": p.prompt[-1]["content"]}] for p in pairs)  # no system turn
    assert stats.table["fr"]["dropped"] == {**dict.fromkeys(DROP_REASONS, 0), "translation_failed": 1}


def test_icr_pairs_follow_the_authors_rules():
    """utils/generate_preference_pair.py with --length_control and an upper bound: lengths of the
    stripped answers; alpha minimises |mean(len(chosen) - len(rejected))| over every prompt at
    chosen = argmax, rejected = argmin of r - alpha * len, the bound ignored; then chosen = the argmax
    among scores under the bound, which is answer 0 when none is (an argmax over all -inf)."""
    sel = ICRSelectionConfig(
        upper_bound=2.5, upper_bound_empty="first", strip_for_length=True, alpha_step=0.5, alpha_max=1.0
    )
    answers = {"p1": ["aa", "bbbb", "c"], "p2": ["dddddd", "e", "ff"], "p3": ["g", "hh", "iii"]}
    rewards = {"p1": [3.0, 1.0, 0.0], "p2": [0.5, 2.0, -1.0], "p3": [5.0, 4.0, 3.0]}
    instructions = {p: f"x_fr[{p}]" for p in answers}
    # alpha 0:   p1 chosen aa (2) rejected c (1): +1; p2 e (1) vs ff (2): -1; p3 g (1) vs iii (3): -2;
    #            mean -2/3.
    # alpha 0.5: p1 s = [2, -1, -0.5]: aa (2) vs bbbb (4): -2; p2 s = [-2.5, 1.5, -2]: e (1) vs
    #            dddddd (6): -5; p3 s = [4.5, 3, 1.5]: g vs iii: -2; mean -3. So alpha = 0.
    # Bound 2.5 at alpha 0: p1 s = [3, 1, 0]: bbbb chosen, c rejected; p2 all under: e, ff;
    # p3 s = [5, 4, 3], none under: answer 0 (g) chosen, iii rejected.
    pairs, selection, stats = icr_pairs(instructions, "fr", answers, rewards, sel, AUTHORS_FILTERS)
    assert selection.alpha == 0.0
    assert [(p.id, p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs] == [
        ("p1", "x_fr[p1]", "bbbb", "c"),
        ("p2", "x_fr[p2]", "e", "ff"),
        ("p3", "x_fr[p3]", "g", "iii"),
    ]
    # The project's default drops p3 (no answer the bound allows), counted as upper_bound.
    pairs, _, stats = icr_pairs(
        instructions, "fr", answers, rewards, ICRSelectionConfig(upper_bound=2.5, alpha_step=0.5), AUTHORS_FILTERS
    )
    assert [p.id for p in pairs] == ["p1", "p2"] and stats["dropped"] == {"upper_bound": 1}


def test_icr_length_of_the_stripped_answer():
    """strip_for_length decides alpha here (grid 0, 1). Stripped lengths [3, 3, 5]: alpha 0 gives
    "  yes  " over "no!" (gap 0), alpha 1 (s = [0, -3, -4.5]) "  yes  " over "maybe" (gap -2): alpha 0.
    Raw lengths [7, 3, 5]: alpha 0 gap +4; alpha 1, s = [-4, -3, -4.5]: "no!" over "maybe" (gap -2):
    alpha 1."""
    answers = {"p": ["  yes  ", "no!", "maybe"]}
    rewards = {"p": [3.0, 0.0, 0.5]}
    for strip, alpha, chosen, rejected in ((True, 0.0, "  yes  ", "no!"), (False, 1.0, "no!", "maybe")):
        sel = ICRSelectionConfig(strip_for_length=strip, alpha_step=1.0, alpha_max=2.0)
        pairs, selection, _ = icr_pairs({"p": "x"}, "fr", answers, rewards, sel, AUTHORS_FILTERS)
        assert (selection.alpha, pairs[0].chosen, pairs[0].rejected) == (alpha, chosen, rejected)


def test_icr_scoring_prompt_without_the_input_field(tmp_path):
    """The authors sample for instruction + input (utils/batch_inference.py, input_format) but score
    under the instruction alone (cross_implicit_reward_prompt): icr.selection.scoring_input false."""
    import json

    from lidr_jax.methods.icr import icr_scoring_prompt, without_input
    from lidr_jax.methods.prompt_sets import load_jsonl_dir

    rows = {
        "en": [{"id": 1, "instruction": "Sum the numbers.", "input": "2, 3"}, {"id": 2, "instruction": "Hi"}],
        "fr": [{"id": 1, "instruction": "Additionne.", "input": "2, 3"}, {"id": 2, "instruction": "Salut"}],
    }
    for lang, rs in rows.items():
        (tmp_path / f"{lang}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    prompts = load_jsonl_dir(tmp_path, ["en", "fr"])
    assert prompts.inputs == {"en": {"1": "2, 3"}, "fr": {"1": "2, 3"}}
    assert prompts.select(["2"]).inputs == {"en": {}, "fr": {}} and prompts.with_languages(["en"]).inputs.keys() == {
        "en"
    }
    english = prompts.by_id("en")
    assert english["1"] == "Sum the numbers.\n2, 3"  # sampling, and scoring by default, see the input
    alone = {pid: without_input(x, prompts.inputs["en"].get(pid)) for pid, x in english.items()}
    assert alone == {"1": "Sum the numbers.", "2": "Hi"}
    assert without_input("Say 2, 3", "2, 3") == "Say 2, 3"  # not joined on a new line: left as it is
    messages = icr_scoring_prompt(alone["1"], "fr", prefix_template="In {language}:")
    assert messages == [{"role": "user", "content": "In French:\n\nSum the numbers."}]
