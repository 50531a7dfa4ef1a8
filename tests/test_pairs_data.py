"""Pair files (TRL and LLaMA-Factory alpaca ranking), chat-template tokenization, truncation, batches."""

import json
from pathlib import Path

import numpy as np
import pytest
from dpo_helpers import tiny_tokenizer

from lidr_jax.formats.tokenizer import ChatTokenizer
from lidr_jax.model.scoring import bucket_length
from lidr_jax.train.pairs import (
    PairFormatError,
    PreferencePair,
    encode_pairs,
    pair_batch,
    read_pairs,
    write_llamafactory,
    write_trl_jsonl,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_trl_strings_messages_alias_and_provenance(tmp_path):
    user = [{"role": "user", "content": "Hola"}]
    f = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Say yes.", "chosen": "yes", "rejected": "no", "lang": "en", "id": "a-1"},
            {
                "prompt": user,
                "chosen": [{"role": "assistant", "content": "Hola!"}],
                "reject": [{"role": "assistant", "content": "Hello"}],
            },
            {
                "chosen": user + [{"role": "assistant", "content": "Buenas"}],
                "rejected": user + [{"role": "assistant", "content": "Hi"}],
            },  # implicit prompt
        ],
    )
    a, b, c = read_pairs(f)
    assert (a.prompt, a.chosen, a.rejected, a.extra) == ("Say yes.", "yes", "no", {"lang": "en", "id": "a-1"})
    assert b.prompt == user and b.rejected == [{"role": "assistant", "content": "Hello"}] and b.extra == {}
    assert c.prompt == user and c.chosen == [{"role": "assistant", "content": "Buenas"}]
    write_trl_jsonl([a, b, c], tmp_path / "out.jsonl")
    assert read_pairs(tmp_path / "out.jsonl") == [a, b, c]
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert list(first) == ["prompt", "chosen", "rejected", "lang", "id"]


def test_alpaca_ranking_old_and_new_forms_json_list(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(
        json.dumps(
            [
                {"instruction": "Translate", "input": "chat", "output": ["cat", "dog"]},
                {
                    "instruction": "Greet",
                    "input": "",
                    "chosen": "hi",
                    "rejected": "bye",
                    "system": "Be kind.",
                    "history": [["one", "uno"]],
                    "lang": "es",
                },
            ]
        )
    )
    a, b = read_pairs(f)
    assert (a.prompt, a.chosen, a.rejected) == ("Translate\nchat", "cat", "dog")  # instruction + "\n" + input
    assert b.prompt == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "Greet"},
    ]
    assert b.extra == {"lang": "es"}
    write_llamafactory([a, b], tmp_path / "a2.jsonl", "a2")
    back = read_pairs(tmp_path / "a2.jsonl")
    assert back[1] == b and back[0].chosen == "cat" and back[0].prompt == "Translate\nchat"


@pytest.mark.parametrize(
    "line,why",
    [
        ('{"prompt": "x", "chosen": "y"', "malformed JSON"),
        ('{"prompt": "x", "chosen": "y"}', "neither TRL"),
        ('{"instruction": "x", "output": ["only one"]}', "list of two strings"),
        ('{"prompt": "x", "chosen": 3, "rejected": "z"}', "`chosen` must be a string"),
        ('["a", "b"]', "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, why):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n' + line + "\n")
    with pytest.raises(PairFormatError, match=rf"bad\.jsonl:3: .*{why}"):
        read_pairs(f)


def test_response_is_assistant_text_plus_end_of_turn(tok):
    enc = encode_pairs([PreferencePair("Say yes.", "yes", "no")], tok, 100, 100)
    assert enc.prompt_ids[0].tolist() == tok.chat_ids([{"role": "user", "content": "Say yes."}])
    assert tok.decode(enc.chosen_ids[0], skip_special_tokens=False) == "yes<|im_end|>\n"
    assert tok.decode(enc.rejected_ids[0], skip_special_tokens=False) == "no<|im_end|>\n"


def test_truncation_rule_and_counts(tok):
    pairs = [PreferencePair("abcdefghij", "0123456789", "xy"), PreferencePair("a", "b", "c")]
    full = encode_pairs(pairs, tok, 1000, 1000)
    enc = encode_pairs(pairs, tok, max_prompt_len=10, max_response_len=5)
    assert enc.truncated_prompts == 2 and enc.truncated_responses == 1  # both prompts > 10 with the template
    assert enc.prompt_ids[0].tolist() == full.prompt_ids[0][-10:].tolist()  # prompt keeps its end
    assert enc.chosen_ids[0].tolist() == full.chosen_ids[0][:5].tolist()  # response keeps its start
    assert enc.rejected_ids[0].tolist() == full.rejected_ids[0].tolist()
    assert "2 prompts (kept their end), 1 responses (kept their start)" in enc.summary()


def test_template_whose_prompt_is_not_a_prefix_fails_clearly():
    bad = tiny_tokenizer().hf
    bad.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]\n{% else %}<end>{% endif %}"
    )
    with pytest.raises(ValueError, match="renders the prompt differently"):
        encode_pairs([PreferencePair("hi", "yo", "no")], ChatTokenizer(bad), 100, 100)


def test_buckets():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 128, 129, 256)] == [16, 16, 32, 128, 128, 256, 256]
    assert [bucket_length(n) for n in (257, 384, 385, 1000)] == [384, 384, 512, 1024]
    assert [bucket_length(n, multiple=48) for n in (1, 48, 49)] == [48, 48, 96]


def test_pair_batch_packs_each_pair_into_one_row_with_filler(tok):
    pairs = [PreferencePair("p", "c" * 3, "r"), PreferencePair("q", "d", "s" * 5)]
    enc = encode_pairs(pairs, tok, 100, 100)
    b = pair_batch(enc, [1], pad_id=0, batch_size=2)
    p, c, r = enc.prompt_ids[1], enc.chosen_ids[1], enc.rejected_ids[1]
    n = len(p) + len(c) + len(r)
    assert b["tokens"].shape == (2, bucket_length(n)) and b["weight"].tolist() == [1.0, 0.0]
    assert b["targets"].shape == (2, bucket_length(len(c) + len(r)))
    assert b["tokens"][0, :n].tolist() == np.concatenate([p, c, r]).tolist()
    assert (b["tokens"][0, n:] == 0).all()
    assert b["chosen_mask"][0].sum() == len(c) and b["rejected_mask"][0].sum() == len(r)
    assert b["tokens"][1, :n].tolist() == b["tokens"][0, :n].tolist()  # filler: a copy with weight 0
    with pytest.raises(ValueError, match="does not fit the batch length"):
        pair_batch(enc, [1], pad_id=0, length=n - 1)
    with pytest.raises(ValueError, match="answer tokens do not fit"):
        pair_batch(enc, [1], pad_id=0, entries=len(c) + len(r) - 1)


def test_real_prompts_roundtrip_with_provenance(tmp_path, tok):
    src = SHARED / "alpagasus" / "id_0_1000" / "fr.jsonl"
    if not src.exists():
        pytest.skip(f"shared data not found at {src} (../shared/data from the repo root)")
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()[:20]]
    pairs = [PreferencePair(r["instruction"], "Oui.", "Non.", {"id": r["id"], "lang": "fr"}) for r in rows]
    write_trl_jsonl(pairs, tmp_path / "fr.jsonl")
    back = read_pairs(tmp_path / "fr.jsonl")
    assert back == pairs
    enc = encode_pairs(back, tok, max_prompt_len=64, max_response_len=8)
    longest = max(len(tok.chat_ids([{"role": "user", "content": r["instruction"]}])) for r in rows)
    assert longest > 64 and enc.truncated_prompts == sum(
        len(tok.chat_ids([{"role": "user", "content": r["instruction"]}])) > 64 for r in rows
    )
    assert max(len(p) for p in enc.prompt_ids) == 64
