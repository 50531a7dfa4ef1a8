"""Tiny chat model for the DPO tests: a character-level tokenizer with a ChatML template and a
random 2-layer Llama (width 32, vocab 128), optionally written as a Hugging Face directory."""

from __future__ import annotations

import json
import string
from pathlib import Path

import jax

from lidr_jax.formats.tokenizer import ChatTokenizer
from lidr_jax.model.config import ModelConfig
from lidr_jax.model.llama import ParamSpec, param_specs

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> ChatTokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    hf.chat_template = CHATML
    return ChatTokenizer(hf)


def tiny_config(vocab_size: int = 128, **changes) -> ModelConfig:
    """The tests' tiny Llama (width 32, 2 layers, 4 heads, 2 kv heads); `changes` set other fields."""
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_ids=(3,),
    )
    return ModelConfig(**{**base, **changes})


def numpy_init(config: ModelConfig, seed: int = 0):
    """Same distribution as model.init_params, drawn with NumPy: eager JAX RNG compiles one kernel
    per weight shape, which costs tens of seconds on a loaded 2-core machine."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def make(spec: ParamSpec):
        if spec.init == "ones":
            return np.ones(spec.shape, np.float32)
        if spec.init == "zeros":
            return np.zeros(spec.shape, np.float32)
        return (0.02 * rng.standard_normal(spec.shape)).astype(np.float32)

    return jax.tree.map(make, param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))


def tiny_model(seed: int = 0):
    tokenizer = tiny_tokenizer()
    config = tiny_config()
    assert tokenizer.vocab_size <= config.vocab_size
    return config, numpy_init(config, seed), tokenizer


def write_tiny_hf_dir(directory: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors + tokenizer files, loadable by lidr_jax.formats.load.load_pretrained."""
    import numpy as np
    from safetensors.numpy import save_file

    from lidr_jax.formats.hf_table import hf_from_params

    config, params, tokenizer = tiny_model(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.asarray(v, np.float32) for k, v in hf_from_params(jax.device_get(params), config).items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**config.to_hf_dict(), "torch_dtype": "float32"}))
    tokenizer.hf.save_pretrained(str(directory))
    return directory


PAIRS = [
    ("Say yes.", "yes", "no"),
    ("Say hi.", "hi there", "go away"),
    ("Count to three.", "1 2 3", "3 2 1"),
    ("Spell cat.", "c a t", "d o g"),
    ("Name a color.", "blue", "seven"),
    ("Add 1 and 1.", "2", "11"),
    ("Say bye.", "bye now", "hello"),
    ("Pick a fruit.", "apple", "rock"),
]
