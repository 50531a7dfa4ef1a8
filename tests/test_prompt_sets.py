"""Prompt sets: the project's default prompts, both shared layouts, datasets sources, slicing, and
every bad-input error (naming file and line)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lidr_jax.methods.prompt_sets import (
    DEFAULT_PROMPTS_DIR,
    SPLITS,
    PromptSetError,
    PromptSourceConfig,
    iteration_slice,
    load_default_prompts,
    load_id_list,
    load_jsonl_dir,
    load_prompts,
    split_heldout,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not present at {SHARED_DATA}")
LANGS = ("en", "es", "de", "fr", "ru", "zh")


def _write(folder: Path, lang: str, records, raw_lines=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(raw_lines)
    (folder / f"{lang}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _simple(folder: Path, langs=("en", "fr"), ids=("a", "b", "c")):
    for lang in langs:
        _write(folder, lang, [{"id": i, "instruction": f"{lang}:{i}"} for i in ids])
    return folder


# ---------------------------------------------------------------- the project's default prompts


def test_default_prompts_aligned_and_complete():
    ps = load_default_prompts()
    assert ps.languages == LANGS and len(ps) == 216
    assert ps.ids == tuple(f"p{i:03d}" for i in range(216))
    kinds = [ps.kinds[i] for i in ps.ids]
    assert kinds.count("general") == 132 and kinds.count("arithmetic") == 70 and kinds.count("translation") == 14
    assert ps.translation_task == {i for i in ps.ids if ps.kinds[i] == "translation"}
    assert set(ps.answers) == {i for i in ps.ids if ps.kinds[i] == "arithmetic"}
    assert ps.answers["p001"] == 8.0  # "Anna has 3 apples and buys 5 more"
    assert ps.answers["p200"] == 125.0  # "A plane has 25 rows with 5 seats in each row"
    for lang in LANGS:
        assert len(set(ps.instructions[lang])) == 216  # no duplicated instruction within a language
        if lang != "en":  # every prompt is translated
            assert all(a != b for a, b in zip(ps.instructions[lang], ps.instructions["en"]))
    # every language file carries the same kind / flag / answer / split for an id
    rows = {
        lang: [json.loads(x) for x in (DEFAULT_PROMPTS_DIR / f"{lang}.jsonl").read_text("utf-8").splitlines()]
        for lang in LANGS
    }
    for lang in LANGS:
        assert [(r["id"], r["kind"], r["translation_task"], r.get("answer"), r["split"]) for r in rows[lang]] == [
            (r["id"], r["kind"], r["translation_task"], r.get("answer"), r["split"]) for r in rows["en"]
        ]
    assert "Apache-2.0" in (DEFAULT_PROMPTS_DIR / "README.md").read_text()
    # consecutive slices mix kinds (spread evenly through the ids)
    first16 = {ps.kinds[i] for i in ps.ids[:16]}
    assert first16 == {"general", "arithmetic", "translation"}


def test_default_prompts_splits():
    """The fixed split: p000-p131 train, p132-p167 dev, p168-p215 heldout; every dev and held-out prompt
    has a reference answer in every language, no training prompt has one."""
    ps = load_default_prompts()
    assert ps.split("train").ids == tuple(f"p{i:03d}" for i in range(132))
    assert ps.split("dev").ids == tuple(f"p{i:03d}" for i in range(132, 168))
    held = ps.split("heldout")
    assert held.ids == tuple(f"p{i:03d}" for i in range(168, 216))
    assert [held.kinds[i] for i in held.ids].count("arithmetic") == 16 and not held.translation_task
    for lang in LANGS:
        assert set(ps.references[lang]) == set(ps.split("dev").ids) | set(held.ids)
    assert ps.references["de"]["p199"] == "Die Hauptstadt von Deutschland ist Berlin."
    assert ps.references["zh"]["p200"] == "25 × 5 = 125，答案是125。"
    assert held.references["fr"] == {i: ps.references["fr"][i] for i in held.ids}  # select keeps them
    assert set(ps.with_languages(["en", "ru"]).references) == {"en", "ru"}


def test_default_source_and_language_subset():
    ps = load_prompts(PromptSourceConfig(languages=("en", "ru")))
    assert ps.languages == ("en", "ru") and len(ps) == 216
    assert ps.by_id("ru")["p000"] == ps.instructions["ru"][0]
    sub = load_default_prompts().with_languages(["en", "zh"])
    assert sub.languages == ("en", "zh") and sub.instruction("zh", "p002") == "澳大利亚的首都是哪里？"


# ---------------------------------------------------------------- the shared data layouts


@needs_shared
def test_lidr_layout_with_translation_task_ids():
    ps = load_jsonl_dir(
        SHARED_DATA / "alpagasus" / "id_0_1000",
        LANGS,
        translation_task_ids=SHARED_DATA / "alpagasus" / "translation_task_ids.jsonl",
    )
    assert len(ps) == 1000 and ps.ids[0] == "alpagasus-0" and ps.ids[-1] == "alpagasus-999"
    assert ps.instructions["en"][0] == "Give three tips for staying healthy."
    all_task_ids = load_id_list(SHARED_DATA / "alpagasus" / "translation_task_ids.jsonl")
    assert len(all_task_ids) == 88
    assert ps.translation_task == all_task_ids & set(ps.ids) and len(ps.translation_task) == 7
    assert {"alpagasus-19", "alpagasus-42"} <= ps.translation_task


@needs_shared
def test_icr_layout():
    ps = load_prompts(
        PromptSourceConfig(
            path=str(SHARED_DATA / "ultrafeedback" / "random_1000"), languages=("en", "es", "ru", "de", "fr")
        )
    )
    assert len(ps) == 1000
    assert ps.ids[0] == "e3de3869be2af2ce60ef6ddaf76bcf998195f464a230886aef6789c627b9a845"
    assert ps.instructions["de"][0] == "Welche Sportart betreiben Bäume am häufigsten?"
    assert ps.translation_task == frozenset()


# ---------------------------------------------------------------- bad input


def test_missing_language_file(tmp_path):
    _simple(tmp_path)
    with pytest.raises(
        PromptSetError, match=r"no prompt file for language 'de': expected .*de\.jsonl \(files there for: en, fr\)"
    ):
        load_jsonl_dir(tmp_path, ["en", "fr", "de"])


def test_ids_that_do_not_align(tmp_path):
    _write(tmp_path, "en", [{"id": i, "instruction": "x"} for i in "abcd"])
    _write(tmp_path, "fr", [{"id": i, "instruction": "x"} for i in "abz"])
    with pytest.raises(
        PromptSetError,
        match=r"do not align.*fr\.jsonl lacks 2 id\(s\) of .*en\.jsonl: 'c', 'd'.*"
        r"fr\.jsonl has 1 id\(s\) not in .*en\.jsonl: 'z'",
    ):
        load_jsonl_dir(tmp_path, ["en", "fr"])


def test_same_ids_in_another_order_align(tmp_path):
    _write(tmp_path, "en", [{"id": i, "instruction": f"en{i}"} for i in "abc"])
    _write(tmp_path, "fr", [{"id": i, "instruction": f"fr{i}"} for i in "cab"])
    ps = load_jsonl_dir(tmp_path, ["fr", "en"])
    assert ps.ids == ("a", "b", "c")  # English order
    assert ps.instructions["fr"] == ("fra", "frb", "frc")


def test_malformed_json_line_names_file_and_line(tmp_path):
    _simple(tmp_path)
    _write(tmp_path, "fr", [{"id": "a", "instruction": "x"}], raw_lines=['{"id": "b", "instruction": '])
    with pytest.raises(PromptSetError, match=r"fr\.jsonl:2: malformed JSON"):
        load_jsonl_dir(tmp_path, ["en", "fr"])


def test_unknown_language_code(tmp_path):
    _simple(tmp_path)
    with pytest.raises(ValueError, match=r"unknown language code 'fre'.*did you mean: fr \(French\)"):
        load_jsonl_dir(tmp_path, ["en", "fre"])


def test_empty_prompt_set(tmp_path):
    _simple(tmp_path)
    (tmp_path / "fr.jsonl").write_text("\n\n")
    with pytest.raises(PromptSetError, match=r"empty prompt set: .*fr\.jsonl has no prompts"):
        load_jsonl_dir(tmp_path, ["en", "fr"])


def test_duplicate_ids(tmp_path):
    _simple(tmp_path)
    _write(
        tmp_path,
        "fr",
        [{"id": "a", "instruction": "x"}, {"id": "b", "instruction": "y"}, {"id": "a", "instruction": "z"}],
    )
    with pytest.raises(PromptSetError, match=r"fr\.jsonl:3: duplicate id 'a' \(first at .*fr\.jsonl:1\)"):
        load_jsonl_dir(tmp_path, ["en", "fr"])


def test_bad_fields(tmp_path):
    _simple(tmp_path)
    _write(tmp_path, "fr", [{"id": "a", "instruction": "x"}, {"id": "b", "text": "y"}])
    with pytest.raises(PromptSetError, match=r"fr\.jsonl:2: no field 'instruction'"):
        load_jsonl_dir(tmp_path, ["en", "fr"])
    _write(tmp_path, "fr", [{"id": i, "instruction": "x", "translation_task": "yes"} for i in "abc"])
    with pytest.raises(PromptSetError, match=r"fr\.jsonl:1: 'translation_task' must be true or false"):
        load_jsonl_dir(tmp_path, ["en", "fr"])
    _write(tmp_path, "fr", [{"id": i, "instruction": "  "} for i in "abc"])
    with pytest.raises(PromptSetError, match=r"fr\.jsonl:1: 'instruction' must be a non-empty string"):
        load_jsonl_dir(tmp_path, ["en", "fr"])
    _write(tmp_path, "fr", [{"key": i, "instruction": "x"} for i in "abc"])
    with pytest.raises(PromptSetError, match=r"fr\.jsonl:1: no id field \(looked for \['id', 'instruction_id'\]"):
        load_jsonl_dir(tmp_path, ["en", "fr"])


def test_translation_task_flag_field_and_id_list(tmp_path):
    _write(
        tmp_path,
        "en",
        [
            {"id": "a", "instruction": "x", "translation_task": True},
            {"id": "b", "instruction": "y"},
            {"id": "c", "instruction": "z", "translation_task": False},
        ],
    )
    _write(tmp_path, "fr", [{"id": i, "instruction": "x"} for i in "abc"])
    assert load_jsonl_dir(tmp_path, ["en", "fr"]).translation_task == {"a"}
    (tmp_path / "ids.txt").write_text("b\nq\n")
    assert load_jsonl_dir(tmp_path, ["en", "fr"], translation_task_ids=tmp_path / "ids.txt").translation_task == {
        "a",
        "b",
    }
    with pytest.raises(PromptSetError, match="id list .*nope.jsonl does not exist"):
        load_jsonl_dir(tmp_path, ["en", "fr"], translation_task_ids=tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- slicing


def test_iteration_slices_and_heldout():
    ps = load_default_prompts(["en", "fr"])
    assert iteration_slice(ps, 0, 32).ids == tuple(f"p{i:03d}" for i in range(32))
    it1 = iteration_slice(ps, 1, 32)
    assert it1.ids == tuple(f"p{i:03d}" for i in range(32, 64))
    assert it1.instructions["fr"] == ps.instructions["fr"][32:64]
    assert it1.translation_task == {i for i in it1.ids if i in ps.translation_task}
    assert iteration_slice(ps, 0, 8, offset=4).ids[0] == "p004"
    assert len(iteration_slice(ps, 3, None, offset=10)) == 206
    with pytest.raises(PromptSetError, match=r"iteration 2 needs prompts 192\.\.287 but .* has 216 prompts"):
        iteration_slice(ps, 2, 96)


def test_split_heldout_follows_the_labels():
    ps = load_default_prompts(["en", "fr"])
    train, held = split_heldout(ps, 48, seed=0)
    assert train.ids == ps.split("train").ids and held.ids == ps.split("heldout").ids  # all 48, any seed
    assert split_heldout(ps, 48, seed=3)[1].ids == held.ids
    train8, held8 = split_heldout(ps, 8, seed=0)
    assert train8.ids == train.ids and len(held8) == 8 and set(held8.ids) < set(held.ids)
    assert list(held8.ids) == sorted(held8.ids)  # order kept
    assert split_heldout(ps, 8, seed=0)[1].ids == held8.ids and split_heldout(ps, 8, seed=1)[1].ids != held8.ids
    # the first iteration slices of the default config (8 a piece) are training prompts only
    assert iteration_slice(train8, 1, 8).ids == tuple(f"p{i:03d}" for i in range(8, 16))
    with pytest.raises(PromptSetError, match="held-out size 49 must be in \\[0, 48\\]: .* labels 48 prompts 'heldout'"):
        split_heldout(ps, 49)
    # while choosing settings the check answers dev prompts; the held-out ones are neither trained on nor seen
    dev = load_prompts(PromptSourceConfig(languages=("en", "fr"), check_split="dev"))
    assert dev.check_split == "dev"
    train_d, held_d = split_heldout(dev, 36, seed=0)
    assert train_d.ids == train.ids and held_d.ids == ps.split("dev").ids


def test_split_heldout_without_labels_draws_with_the_seed(tmp_path):
    ps = load_jsonl_dir(_simple(tmp_path, ids=[f"q{i:02d}" for i in range(20)]), ["en", "fr"])
    assert ps.splits == {} and ps.split("train").ids == ps.ids and len(ps.split("heldout")) == 0
    train, held = split_heldout(ps, 5, seed=0)
    assert len(train) == 15 and len(held) == 5 and not set(train.ids) & set(held.ids)
    assert list(train.ids) == sorted(train.ids) and list(held.ids) == sorted(held.ids)  # order kept
    assert split_heldout(ps, 5, seed=0)[1].ids == held.ids and split_heldout(ps, 5, seed=1)[1].ids != held.ids
    with pytest.raises(PromptSetError, match="held-out size 20"):
        split_heldout(ps, 20)
    with pytest.raises(PromptSetError, match="check split 'dev' needs a prompt set whose rows carry `split` labels"):
        split_heldout(replace(ps, check_split="dev"), 5)


def test_split_labels_errors(tmp_path):
    def rows(split_fr="dev", reference="réponse"):
        en = [{"id": "a", "instruction": "A", "split": "train"}, {"id": "b", "instruction": "B", "split": "dev"}]
        fr = [{"id": "a", "instruction": "A"}, {"id": "b", "instruction": "B", "split": split_fr}]
        fr[1]["reference"] = reference
        return en, fr

    def load(en, fr):
        _write(tmp_path, "en", en)
        _write(tmp_path, "fr", fr)
        return load_jsonl_dir(tmp_path, ["en", "fr"])

    ps = load(*rows())
    assert ps.splits == {"a": "train", "b": "dev"} and ps.references == {"fr": {"b": "réponse"}}
    assert SPLITS == ("train", "dev", "heldout")
    with pytest.raises(PromptSetError, match=r"fr\.jsonl:2: split 'heldout' for id 'b', but .*en\.jsonl:2 says 'dev'"):
        load(*rows(split_fr="heldout"))
    with pytest.raises(
        PromptSetError, match=r"fr\.jsonl:2: 'split' must be one of \['train', 'dev', 'heldout'\], got 'test'"
    ):
        load(*rows(split_fr="test"))
    with pytest.raises(PromptSetError, match=r"fr\.jsonl:2: 'reference' must be a non-empty string, got ' '"):
        load(*rows(reference=" "))
    with pytest.raises(PromptSetError, match="labels no prompt 'train'"):
        split_heldout(replace(ps.select(["b"]), check_split="dev"), 1)


# ---------------------------------------------------------------- datasets sources


def test_datasets_source_with_language_column(tmp_path):
    pytest.importorskip("datasets", reason="the optional `datasets` extra is not installed")
    rows = [
        {"uid": n, "prompt": f"{lang}-{n}", "lang": lang, "translation_task": n == 2}
        for lang in ("fr", "en", "de")
        for n in (1, 2, 3)
    ]
    path = tmp_path / "all.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    src = PromptSourceConfig(
        path=str(path), languages=("en", "fr"), id_column="uid", instruction_column="prompt", language_column="lang"
    )
    ps = load_prompts(src)
    assert ps.ids == ("1", "2", "3") and ps.instructions["fr"] == ("fr-1", "fr-2", "fr-3")
    assert ps.translation_task == {"2"}
    with pytest.raises(PromptSetError, match=r"no column 'prompt_text'"):
        load_prompts(
            PromptSourceConfig(
                path=str(path),
                languages=("en",),
                id_column="uid",
                instruction_column="prompt_text",
                language_column="lang",
            )
        )
    with pytest.raises(PromptSetError, match="cannot tell languages apart"):
        load_prompts(PromptSourceConfig(path=str(path), languages=("en",), format="datasets"))


def test_datasets_source_one_file_per_language(tmp_path):
    pytest.importorskip("datasets", reason="the optional `datasets` extra is not installed")
    import pandas as pd

    for lang in ("en", "es"):
        pd.DataFrame({"instruction_id": ["x", "y"], "instruction": [f"{lang} x", f"{lang} y"]}).to_parquet(
            tmp_path / f"{lang}.parquet"
        )
    pd.DataFrame({"id": ["x", "y"], "instruction": ["de x", "de y"]}).to_csv(tmp_path / "de.csv", index=False)
    ps = load_prompts(PromptSourceConfig(path=str(tmp_path), data_files="{lang}.parquet", languages=("en", "es")))
    assert ps.ids == ("x", "y") and ps.instructions["es"] == ("es x", "es y")
    ps = load_prompts(PromptSourceConfig(path=str(tmp_path / "{lang}.csv"), languages=("de",)))
    assert ps.instructions["de"] == ("de x", "de y")
    with pytest.raises(PromptSetError, match=r"no prompt file for language 'fr': .*fr\.csv does not exist"):
        load_prompts(PromptSourceConfig(path=str(tmp_path / "{lang}.csv"), languages=("de", "fr")))


def test_missing_datasets_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no module named datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(
        PromptSetError, match=r"needs the optional package `datasets`: pip install 'lidr_jax\[datasets\]'"
    ):
        load_prompts(PromptSourceConfig(path=str(tmp_path / "{lang}.parquet"), languages=("en",)))
