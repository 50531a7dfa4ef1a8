"""Tokenizer and chat template: always the model's own, through transformers (no torch needed).

`ChatTokenizer` wraps a transformers `PreTrainedTokenizerFast` (from a model directory, or built from
GGUF metadata by lidr_jax.formats.gguf) and adds what the pipeline needs on top: chat messages to
token ids with an optional assistant-turn prefill, and every token id that ends a turn
(`end_of_sequence_ids`, the one place that set is worked out: the loaders, the sampler and the export's
generation_config.json all ask it).
"""

from __future__ import annotations

from collections.abc import Sequence

Message = dict[str, str]

# Chat end-of-turn markers of the common templates. Any of them that is a single token of the
# vocabulary ends generation, besides the ids the model's own config names.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>")


def eos_id_list(value) -> list[int]:
    """An `eos_token_id` field as config.json and generation_config.json write it (one id, a list of
    ids, or null) as a list of ids."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def end_of_sequence_ids(tokenizer: ChatTokenizer | None, *eos_fields) -> tuple[int, ...]:
    """Every id that ends a turn, sorted: the tokenizer's EOS and end-of-turn tokens (none without a
    tokenizer) and each of `eos_fields` (`eos_token_id` values, see `eos_id_list`)."""
    ids = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
    for field in eos_fields:
        ids.update(eos_id_list(field))
    return tuple(sorted(ids))


class ChatTokenizer:
    """The model's tokenizer with its chat template. `.hf` is the underlying transformers tokenizer."""

    def __init__(self, hf_tokenizer, extra_eos_ids: Sequence[int] = ()):
        """`extra_eos_ids`: ids besides the tokenizer's EOS and the end-of-turn tokens that end a turn
        (the model config's and generation config's `eos_token_id`)."""
        self.hf = hf_tokenizer
        vocab = hf_tokenizer.get_vocab()
        eos = set(eos_id_list(list(extra_eos_ids)))
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        eos |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eos))
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id: int = int(pad if pad is not None else (min(eos) if eos else 0))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as text."""
        if not self.has_chat_template:
            raise ValueError(
                "this tokenizer has no chat template; pass prompts as plain strings, or use an "
                "instruction-tuned model whose tokenizer_config.json (or GGUF metadata) has one"
            )
        return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def chat_ids(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        prefill: str | None = None,
    ) -> list[int]:
        """Token ids of `messages` in the chat template.

        `prefill` is text that opens the assistant turn: generation continues after it (the LIDR
        translation prompt pre-fills the opening tag). The template's own special tokens (BOS) come
        from the template text, so no extra BOS is added.
        """
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        if prefill:
            text += prefill
        return self.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: str | Sequence[Message], prefill: str | None = None) -> list[int]:
        """A raw string is encoded as it is (with the tokenizer's BOS if it adds one); a message list
        goes through the chat template with the generation prompt."""
        if isinstance(prompt, str):
            return self.encode(prompt + (prefill or ""), add_special_tokens=True)
        return self.chat_ids(prompt, add_generation_prompt=True, prefill=prefill)
