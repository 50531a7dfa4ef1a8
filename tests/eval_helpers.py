"""A tiny random chat model for the evaluation tests, built without torch: the shared character-level
tokenizer of conftest (ChatML template, 160 ids) over a random 2-layer Llama of width 32 whose context
is long enough for whole MGSM prompts (one token per character)."""

from __future__ import annotations

import jax
from conftest import TINY_VOCAB, build_tiny_hf_tokenizer
from dpo_helpers import tiny_config

from lidr_jax.formats.load import Model
from lidr_jax.formats.tokenizer import ChatTokenizer
from lidr_jax.model.llama import init_params


def tiny_random_model(seed: int = 0, max_len: int = 2048) -> Model:
    config = tiny_config(TINY_VOCAB, max_position_embeddings=max_len, eos_token_ids=(2,))
    tokenizer = ChatTokenizer(build_tiny_hf_tokenizer())
    return Model(config, init_params(config, jax.random.key(seed)), tokenizer, source=f"tiny-random-{seed}")
