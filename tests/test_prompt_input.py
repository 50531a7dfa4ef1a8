"""Prompt files in the Alpaca layout: an `input` field follows the instruction on a new line (as the
LIDR authors' scripts build the question), an empty one adds nothing, a non-string one is an error."""

import json

import pytest

from lidr_jax.methods.prompt_sets import PromptSetError, load_jsonl_dir


def _write(folder, lang, rows):
    (folder / f"{lang}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_input_is_appended_with_a_newline(tmp_path):
    _write(
        tmp_path,
        "en",
        [{"id": 1, "instruction": "Sum the numbers.", "input": "2, 3"}, {"id": 2, "instruction": "Hi", "input": ""}],
    )
    _write(
        tmp_path,
        "fr",
        [{"id": 1, "instruction": "Additionne les nombres.", "input": "2, 3"}, {"id": 2, "instruction": "Salut"}],
    )
    ps = load_jsonl_dir(tmp_path, ["en", "fr"])
    assert ps.by_id("en") == {"1": "Sum the numbers.\n2, 3", "2": "Hi"}
    assert ps.by_id("fr") == {"1": "Additionne les nombres.\n2, 3", "2": "Salut"}


def test_input_must_be_a_string(tmp_path):
    _write(tmp_path, "en", [{"id": 1, "instruction": "Sum.", "input": [2, 3]}])
    _write(tmp_path, "fr", [{"id": 1, "instruction": "Somme."}])
    with pytest.raises(PromptSetError, match=r"en.jsonl:1: 'input' must be a string, got \[2, 3\]"):
        load_jsonl_dir(tmp_path, ["en", "fr"])
