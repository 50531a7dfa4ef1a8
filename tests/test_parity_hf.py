"""Parity with transformers: tiny random HF checkpoints loaded by `load_pretrained` give the same logits.

Each architecture case runs twice: an unpadded batch, and a left-padded batch of different lengths
compared with transformers run on each unpadded sequence alone (only real-token logits compared).
Tolerance: max abs logit difference <= 1e-4 in float32 (logits are O(1) because the fixtures
initialise with std 0.08). The same holds for GGUF files written from those checkpoints the way
llama.cpp writes them (q/k rows permuted, llama3 rope as `rope_freqs`), loaded by `load_pretrained`.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import CHAT_TEMPLATE

from lidr_jax.formats.load import load_pretrained
from lidr_jax.model.config import config_from_hf
from lidr_jax.model.llama import forward

TOL = 1e-4
# One compile per architecture: the unpadded batch passes an all-ones mask so both variants share it.
_forward = jax.jit(forward, static_argnames=("config",))

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # the test sequences run to position 39
}
CASES = {
    "gqa_tied": ("llama", {"tie_word_embeddings": True, "generation_eos": [2, 0]}),
    "mha_untied_sharded": ("llama", {"num_key_value_heads": 4, "max_shard_size": "60KB", "seed": 1}),
    "llama3_rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500.0, "seed": 2}),
    "linear_rope_bf16_checkpoint": (
        "llama",
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "torch_dtype": "bfloat16", "seed": 3},
    ),
    "head_dim_24": ("llama", {"head_dim": 24, "seed": 4}),
    "qwen2_bias": ("qwen2", {"seed": 5}),
    "mistral": ("mistral", {"seed": 6}),
}


def _reference_logits(hf_model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, padded, make_hf_model, torch_model):
    model_type, kwargs = CASES[case]
    path = make_hf_model(model_type, **kwargs)
    model = load_pretrained(path)
    hf_model = torch_model(path)  # a bf16 checkpoint is upcast to float32 here, as ours is
    rng = np.random.default_rng(0)
    V, T = model.config.vocab_size, 40
    lengths = [T, T - 7, T - 19] if padded else [T, T, T]
    seqs = [rng.integers(4, V, size=n).tolist() for n in lengths]
    tokens_BT = np.zeros((len(seqs), T), np.int32)
    mask_BT = np.zeros((len(seqs), T), np.int32)
    for b, seq in enumerate(seqs):
        tokens_BT[b, T - len(seq) :] = seq
        mask_BT[b, T - len(seq) :] = 1
    logits = np.asarray(_forward(model.params, tokens_BT, model.config, attention_mask_BT=mask_BT))
    assert logits.shape == (len(seqs), T, V) and logits.dtype == np.float32
    for b, seq in enumerate(seqs):
        ref = _reference_logits(hf_model, seq)
        ours = logits[b, T - len(seq) :]
        assert float(np.abs(ref).max()) > 0.3, "logits too small for the comparison to mean anything"
        diff = float(np.abs(ours - ref).max())
        assert diff <= TOL, f"{case} seq {b}: max abs logit diff {diff:.2e} > {TOL}"
        assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_loaded_model_fields(tiny_llama_dir):
    model = load_pretrained(tiny_llama_dir)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == (4, 2, 16, True)
    assert "lm_head" not in model.params
    assert model.generation_config["eos_token_id"] == [2, 0]
    assert model.tokenizer.eos_token_ids == (0, 2)  # generation_config's list plus the end-of-turn markers
    assert model.source == str(tiny_llama_dir)
    text = "Hello, мир! 你好"
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == text


def test_param_and_compute_dtype(make_hf_model):
    path = make_hf_model("llama", seed=9)
    model = load_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")
    assert model.params["layers"]["wq"].dtype.name == "bfloat16"
    assert (model.config.param_dtype, model.config.dtype) == ("bfloat16", "bfloat16")


def test_rope_parameters_spelling_gives_same_config():
    """transformers 5 writes `rope_parameters` (theta inside); hub checkpoints have rope_theta + rope_scaling."""
    base = {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
    }
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    old = config_from_hf(dict(base, rope_theta=500000.0, rope_scaling=dict(scaling, rope_type="llama3")))
    new = config_from_hf(dict(base, rope_parameters=dict(scaling, rope_type="llama3", rope_theta=500000.0)))
    assert old == new
    assert (new.rope_type, new.rope_theta) == ("llama3", 500000.0)
    # The legacy "type" key also names the rope type.
    legacy = config_from_hf(dict(base, rope_theta=500000.0, rope_scaling=dict(scaling, type="llama3")))
    assert legacy == new


# ----------------------------------------------------------------------------- GGUF written from HF
# A tiny HF checkpoint converted the way llama.cpp's convert_hf_to_gguf does (llama.cpp names, q/k rows
# permuted for the llama architecture, float32 tensors), then loaded by `load_pretrained(file.gguf)`:
# the logits must equal transformers' on the original checkpoint.

_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _llama_cpp_permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_vocab(V: int):
    """Byte-level tokens: 3 control tokens, the printable ASCII bytes, space/newline, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    merges = ["h e", "Ġ t", "Ġt he", "1 2"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spell[b] for b in [10, 32, *range(33, 127)]]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += [f"<unused_{i}>" for i in range(V - len(tokens))]
    return tokens, [3, 3, 3] + [1] * (V - 3), merges


def _write_gguf_from_hf(hf_dir, out, arch, pre, rope_freqs=None, add_bos=False):
    import gguf
    from safetensors.numpy import load_file

    hf = json.loads((hf_dir / "config.json").read_text())
    N, K = hf["num_attention_heads"], hf["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    tokens, types, merges = _gguf_vocab(hf["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in load_file(hf_dir / "model.safetensors").items():
        if name in _GGUF_TOP:
            gname = _GGUF_TOP[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_GGUF_LAYER[rest]}"
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _llama_cpp_permute(t, N)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _llama_cpp_permute(t, K)
        w.add_tensor(gname, np.ascontiguousarray(t, np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
GGUF_CASES = {
    "llama_gqa_tied": ("llama", {"tie_word_embeddings": True, "seed": 10}, "llama-bpe"),
    "llama31_rope_freqs": ("llama", {"rope_scaling": LLAMA31_ROPE, "rope_theta": 10000.0, "seed": 11}, "llama-bpe"),
    "qwen2_bias": ("qwen2", {"seed": 12}, "qwen2"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_from_hf_matches_transformers(case, make_hf_model, torch_model, tmp_path):
    arch, kwargs, pre = GGUF_CASES[case]
    hf_dir = make_hf_model(arch, **kwargs)
    reference = load_pretrained(hf_dir).config
    rope_freqs = None
    if reference.rope_type == "llama3":  # llama.cpp stores llama3 scaling as per-frequency divisors
        rope_freqs = reference.replace(rope_type="default", rope_scaling=()).inv_freq() / reference.inv_freq()
    file = _write_gguf_from_hf(hf_dir, tmp_path / "m.gguf", arch, pre, rope_freqs, add_bos=arch == "llama")
    model = load_pretrained(file)
    assert model.config == reference.replace(eos_token_ids=(2,), bos_token_id=1)
    seq = np.random.default_rng(1).integers(3, reference.vocab_size, size=40).tolist()
    logits = np.asarray(
        _forward(model.params, np.asarray([seq], np.int32), model.config, attention_mask_BT=np.ones((1, 40), np.int32))
    )[0]
    diff = float(np.abs(logits - _reference_logits(torch_model(hf_dir), seq)).max())
    assert diff <= TOL, f"{case}: max abs logit diff {diff:.2e}"
    # The tokenizer from metadata: pre-tokenizer by `tokenizer.ggml.pre`, control tokens whole, BOS flag.
    tok = model.tokenizer.hf
    pieces = tok.convert_ids_to_tokens(tok.encode("<|im_start|>he the 1234", add_special_tokens=False))
    digits = ["12", "3", "4"] if pre == "llama-bpe" else ["1", "2", "3", "4"]  # \p{N}{1,3} vs \p{N}
    assert pieces == ["<|im_start|>", "he", "Ġthe", "Ġ", *digits]
    assert tok.decode(tok.encode("x 1234\n", add_special_tokens=False)) == "x 1234\n"
    assert tok.encode("a", add_special_tokens=True)[0] == (1 if arch == "llama" else tok.convert_tokens_to_ids("a"))
    assert model.tokenizer.render_chat([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user\nhi")


def test_gguf_sentencepiece_tokenizer_matches_sentencepiece(tmp_path):
    """A `tokenizer.ggml.model == "llama"` vocabulary (pieces + scores, no merges, as llama.cpp writes
    Llama 2 / TinyLlama) rebuilt as BPE encodes exactly as sentencepiece itself."""
    import io

    import gguf
    import sentencepiece as spm

    from lidr_jax.formats import gguf as gguf_import

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Le renard brun saute par-dessus le chien.",
        "Быстрая коричневая лиса прыгает через собаку.",
        "In 2024 there were 12345 foxes and 678 dogs.",
    ]
    buf = io.BytesIO()
    # Llama 2's trainer settings that matter: BPE, byte fallback, split digits, no normalization.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(
        [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    )
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf_import._reader(tmp_path / "spm.gguf")
    meta = gguf_import._fields(reader)
    tok = gguf_import.gguf_tokenizer(reader, meta, gguf_import._array(reader, "tokenizer.ggml.tokens"))
    samples = corpus + ["  double  spaces and a newline\nhere", "unseen: 你好 ñ", "x=1000000", "dog.</s>"]
    for text in samples[:-1]:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.encode(samples[-1])[-1] == 2  # a control token in the text is matched whole
    assert tok.encode("dog", add_special_tokens=True) == [1] + sp.encode("dog")  # BOS by default, as llama.cpp
    assert tok.eos_token_ids == (2,)
