"""GGUF import (llama.cpp's file format): dequantized weights, architecture and tokenizer, no torch.

Weights: every tensor is dequantized to float32 with `gguf.quants.dequantize` (the same numpy code
transformers uses, so both see identical numbers), renamed to its Hugging Face name and handed to
`weights.params_from_hf`, so a GGUF gets the same missing/unexpected/shape checks as safetensors.
llama.cpp's converter permutes the rows of q and k for the `llama` architecture (its rotary embedding
rotates interleaved pairs; HF's rotates halves); `_unpermute` undoes that. qwen2 files are not
permuted (llama.cpp runs qwen2 with the halves layout).

Architecture: from the `{arch}.*` metadata (llama and qwen2). Tokenizer: rebuilt from the
`tokenizer.ggml.*` metadata with the `tokenizers` library, so the chat template and special tokens are
the file's own. Byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3, Qwen2), with the
pre-tokenizer chosen by `tokenizer.ggml.pre` (the name of the original tokenizer's splitting rule), and
sentencepiece BPE (`"llama"`: Llama 2, TinyLlama, Mistral v0.1) rebuilt from pieces and scores.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lidr_jax.formats.hf_table import params_from_hf
from lidr_jax.formats.tokenizer import ChatTokenizer
from lidr_jax.model.config import ModelConfig, UnsupportedConfigError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name -> Hugging Face name ({i} is the layer).
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# Known Llama-3.x rope scalings. llama.cpp stores llama3 scaling only as the precomputed per-frequency
# divisors (`rope_freqs.weight`), not its parameters; we recognise the published settings by value.
_LLAMA3_CANDIDATES = (
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0},
)

# The splitting rule of each `tokenizer.ggml.pre` value, as the original tokenizer.json spells it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
_QWEN2_PRES = ("qwen2", "deepseek-r1-qwen")
_GPT2_PRES = ("gpt2", "default", None)
_SMOLLM_PRES = ("smollm",)
_EXTRA_EOS_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


class GGUFImportError(ValueError):
    """The GGUF file describes something lidr_jax cannot load."""


class _Reader(gguf.GGUFReader):
    """A `gguf.GGUFReader` whose buffer is a plain ndarray over the memory map.

    The stock reader slices an `np.memmap` once per metadata string (~100k for a 49k vocabulary), and
    every memmap slice pays a Python `__array_finalize__`; over a plain ndarray view of the same mapping
    the same parse is several times faster. Nothing is copied: the tensors stay lazy.
    """

    @property
    def data(self):
        return self._buffer

    @data.setter
    def data(self, value):
        self._buffer = value.view(np.ndarray)


def _reader(path: Path) -> _Reader:
    return _Reader(path)


def _open_gguf(path: Path):
    """The file's reader; a file that is not a complete GGUF raises `GGUFImportError` naming it."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) < 4 and b"GGUF".startswith(magic):
        raise GGUFImportError(f"{path}: the GGUF file is truncated ({len(magic)} bytes); download or copy it again")
    if magic != b"GGUF":
        raise GGUFImportError(
            f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a llama.cpp .gguf model file"
        )
    try:
        return _reader(path)
    except (ValueError, IndexError, KeyError, OverflowError, EOFError) as e:
        # gguf's reader fails on a short buffer with numpy errors that do not name the file.
        raise GGUFImportError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it is truncated or damaged: download or copy it again"
        ) from None


def _fields(reader) -> dict[str, Any]:
    """Scalar metadata as Python values; arrays are read on demand by `_array`."""
    out = {}
    for key, field in reader.fields.items():
        if key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores",
        ):
            continue
        out[key] = field.contents()
    return out


def _array(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(x)))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's `reshape(n_head, 2, rows/n_head/2, ...).swapaxes(1, 2)` on q/k rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_scaling(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, float]:
    """The llama3 rope-scaling parameters whose divisors equal the file's `rope_freqs.weight`."""
    base = ModelConfig(1, head_dim, 1, 1, 1, 1, head_dim, 1, rope_theta=theta)
    inv = base.inv_freq()
    for cand in _LLAMA3_CANDIDATES:
        scaled = base.replace(rope_type="llama3", rope_scaling=tuple(sorted(cand.items()))).inv_freq()
        if np.allclose(inv / scaled, rope_freqs, rtol=1e-4):
            return cand
    raise GGUFImportError(
        "this GGUF carries rope_freqs.weight (llama3 rope scaling stored as per-frequency factors) that match "
        "no known Llama-3.x setting; convert the original Hugging Face checkpoint instead and load that directory"
    )


def gguf_config(
    meta: dict[str, Any], tensor_names: set[str], vocab_size: int, rope_freqs=None, **dtype_policy
) -> ModelConfig:
    """`ModelConfig` from GGUF metadata (`{arch}.*` keys) and the tensor names (tied embeddings, biases)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedConfigError(
            f"GGUF general.architecture={arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFImportError(f"GGUF metadata lacks {arch}.{key}")
        return value

    D, N = int(get("embedding_length")), int(get("attention.head_count"))
    H = int(meta.get(f"{arch}.attention.key_length") or D // N)
    if int(meta.get(f"{arch}.attention.value_length") or H) != H:
        raise UnsupportedConfigError("GGUF attention.value_length differs from key_length; not supported")
    rot = int(meta.get(f"{arch}.rope.dimension_count") or H)
    if rot != H:
        raise UnsupportedConfigError(
            f"GGUF {arch}.rope.dimension_count={rot} < head dim {H}: partial rotary embeddings are not supported"
        )
    theta = _f32(get("rope.freq_base", 10000.0))
    rope_type, scaling = "default", {}
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_type, scaling = "linear", {"factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in ("none", None):
        raise UnsupportedConfigError(
            f"GGUF {arch}.rope.scaling.type={scaling_type!r} is not supported "
            "(supported: none, linear, and llama3 via rope_freqs)"
        )
    if rope_freqs is not None:
        rope_type, scaling = "llama3", _llama3_scaling(rope_freqs, theta, H)
    n_layers = int(get("block_count"))
    head_count_kv = meta.get(f"{arch}.attention.head_count_kv") or N
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=int(meta.get(f"{arch}.vocab_size") or vocab_size),
        hidden_size=D,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=N,
        num_key_value_heads=int(head_count_kv),
        head_dim=H,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_type=rope_type,
        rope_scaling=tuple(sorted(scaling.items())),
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        model_type=arch,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        **dtype_policy,
    )


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; unknown names pass through (and are reported unexpected)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return gguf_name


def _read_config(path: Path, dtype_policy: dict[str, str]):
    """(reader, metadata, tensors by name without rope_freqs, ModelConfig) of a `.gguf` file; no weight read
    but the small rope_freqs table."""
    reader = _open_gguf(path)
    try:
        meta = _fields(reader)
    except UnicodeDecodeError as e:
        raise GGUFImportError(
            f"{path}: a metadata string is not UTF-8 ({e.reason}); the file is damaged: download or copy it again"
        ) from None
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFImportError(f"{path} has no token_embd.weight; is it a language model GGUF?")
    # Llama-3.x scaling factors are not a weight of the model; they become part of the config.
    rf = tensors.pop("rope_freqs.weight", None)
    rope_freqs = None if rf is None else dequantize(rf.data, rf.tensor_type).reshape(-1)
    return reader, meta, tensors, gguf_config(meta, set(tensors), int(embed.shape[-1]), rope_freqs, **dtype_policy)


def read_gguf_config(path: str | Path, **dtype_policy: str) -> ModelConfig:
    """The architecture of a `.gguf` file from its metadata and tensor names (no weights dequantized)."""
    return _read_config(Path(path), dtype_policy)[3]


def load_gguf(path: str | Path, **dtype_policy: str) -> tuple[ModelConfig, dict, ChatTokenizer, dict]:
    """(config, numpy params, tokenizer, generation config dict) from a `.gguf` file.

    Tensors are dequantized one at a time as `params_from_hf` asks for them, so peak host memory is the
    float32 params plus one tensor.
    """
    path = Path(path)
    reader, meta, tensors, config = _read_config(path, dtype_policy)
    tokens = _array(reader, "tokenizer.ggml.tokens")
    by_hf = {hf_name(name): t for name, t in tensors.items()}
    permuted = meta["general.architecture"] == "llama"

    def get(name: str) -> np.ndarray:
        t = by_hf[name]
        w = dequantize(t.data, t.tensor_type)
        if permuted and name.endswith("q_proj.weight"):
            w = _unpermute(w, config.num_attention_heads)
        elif permuted and name.endswith("k_proj.weight"):
            w = _unpermute(w, config.num_key_value_heads)
        return w

    tokenizer = gguf_tokenizer(reader, meta, tokens)  # before the weights: an unsupported tokenizer fails fast
    params = params_from_hf(get, set(by_hf), config, source=str(path))
    # What a generation_config.json would say: the file's eos plus its end-of-turn ids (Llama 3's eot).
    eos = list(config.eos_token_ids) + [int(meta[k]) for k in _EXTRA_EOS_KEYS if k in meta]
    generation_config: dict[str, Any] = {} if config.bos_token_id is None else {"bos_token_id": config.bos_token_id}
    if eos:
        generation_config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config, params, tokenizer, generation_config


def _pre_tokenizer(pre: str | None):
    """(normalizer, pre-tokenizer) of the original tokenizer that `tokenizer.ggml.pre` names."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _SMOLLM_PRES:
        # SmolLM2's tokenizer.json: every digit its own piece, then GPT-2's regex.
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in _LLAMA3_PRES:
        return None, pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level])
    if pre in _QWEN2_PRES:
        return normalizers.NFC(), pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"), byte_level]
        )
    if pre in _GPT2_PRES:
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False)
    known = _SMOLLM_PRES + _LLAMA3_PRES + _QWEN2_PRES + tuple(p for p in _GPT2_PRES if p)
    raise GGUFImportError(
        f"GGUF tokenizer.ggml.pre={pre!r}: this pre-tokenizer is not known to lidr_jax (known: {', '.join(known)}); "
        "load the original Hugging Face directory instead, whose tokenizer.json states it"
    )


def _byte_level_bpe(tokens: list[str], merges: list[str], meta: dict[str, Any]):
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`): tokens are spelled in GPT-2's byte alphabet."""
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, fuse_unk=False, byte_fallback=False)
    )
    normalizer, pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok, False


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two pieces, best
    score first (transformers' SentencePieceExtractor; llama.cpp files carry scores, not merges)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(score, lr) for lr in local]
    merges.sort(key=lambda m: -m[0])  # stable: ties keep vocabulary order
    return [lr for _, lr in merges]


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, merges: list[str] | None, meta):
    """Sentencepiece BPE (`tokenizer.ggml.model == "llama"`: Llama 2, TinyLlama, Mistral v0.1), as the
    tokenizer.json transformers writes for them: "▁" for spaces, a leading "▁", byte fallback."""
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores is not None:
        pairs = _sentencepiece_merges(tokens, scores)
    else:
        raise GGUFImportError("sentencepiece GGUF without tokenizer.ggml.scores or merges; cannot rebuild its BPE")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=pairs,
            fuse_unk=True,
            byte_fallback=True,
            unk_token=None if unk_id is None else tokens[int(unk_id)],
        )
    )
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, True  # llama.cpp adds BOS to sentencepiece models unless the file says otherwise


def gguf_tokenizer(reader, meta: dict[str, Any], tokens: list[str] | None) -> ChatTokenizer:
    """The file's tokenizer rebuilt with `tokenizers`, with its special tokens and chat template."""
    # transformers is a heavy import, paid only when a GGUF's tokenizer is built.
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if tokens is None:
        raise GGUFImportError("the GGUF has no tokenizer.ggml.tokens; lidr_jax needs the model's own tokenizer")
    merges = _array(reader, "tokenizer.ggml.merges")
    types = _array(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok, add_bos_default = _byte_level_bpe(tokens, merges or [], meta)
    elif kind == "llama":
        tok, add_bos_default = _sentencepiece_bpe(tokens, _array(reader, "tokenizer.ggml.scores"), merges, meta)
    else:
        raise GGUFImportError(
            f"GGUF tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' "
            "sentencepiece BPE); load the original Hugging Face directory of this model instead (its tokenizer "
            "files are read directly)"
        )
    vocab = {t: i for i, t in enumerate(tokens)}

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    bos = token("bos_token_id")
    post = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    if meta.get("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None:
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
            )
        )
    tok.post_processor = processors.Sequence(post)
    # Control tokens (type 3) are special: matched whole and skipped when decoding; user-defined
    # tokens (type 4) are matched whole but kept.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    extra_eos = [int(meta[k]) for k in _EXTRA_EOS_KEYS if k in meta]
    return ChatTokenizer(hf, extra_eos_ids=extra_eos)
