"""Model architecture configuration, read from a Hugging Face `config.json`.

`ModelConfig` is a frozen (hashable) dataclass so it can be passed to `jax.jit` as a static argument.
It holds the architecture only; run settings (sampling, DPO, mesh, run) live in their own modules.

Supported: model types llama, mistral and qwen2 (Llama 2/3/3.1/3.2, Mistral without sliding window,
Qwen2/2.5, SmolLM2, TinyLlama). Anything else fails with an `UnsupportedConfigError` naming the field,
because a silently-wrong architecture produces fluent-looking garbage that no test would notice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


class UnsupportedConfigError(ValueError):
    """A `config.json` field has a value lidr_jax does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder. Field names follow Hugging Face where one exists."""

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K
    head_dim: int  # H
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Rope scaling parameters as sorted (name, value) pairs: hashable, unlike a dict.
    rope_scaling: tuple[tuple[str, float], ...] = ()
    attention_bias: bool = False  # q/k/v projections carry a bias (qwen2)
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Dtype policy: parameters are stored in `param_dtype`; matmuls run in `dtype`. Norms, softmax,
    # rotary embeddings and the output logits are always float32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Training passes run the layers under one `lax.scan` (compile time flat in depth). False unrolls
    # them: the same numbers, a longer compile, and a cost analysis that counts every layer (XLA counts
    # a loop's body once; lidr_jax.pipeline.plan compiles unrolled for its estimates).
    scan_layers: bool = True

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                raise UnsupportedConfigError(f"{field}={getattr(self, field)!r}; choose one of {DTYPES}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (GQA group size G = N / K)."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [H/2] in float32, rope scaling applied (as transformers does)."""
        H = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
        scaling = dict(self.rope_scaling)
        if self.rope_type == "linear":
            inv = inv / scaling["factor"]
        elif self.rope_type == "llama3":
            inv = _llama3_inv_freq(inv, scaling)
        return inv.astype(np.float32)

    def to_hf_dict(self) -> dict[str, Any]:
        """The architecture fields of a Hugging Face `config.json` (the export writes these)."""
        rope_scaling = None
        if self.rope_type != "default":
            rope_scaling = {"rope_type": self.rope_type, **dict(self.rope_scaling)}
            if "original_max_position_embeddings" in rope_scaling:  # stored as float for hashing; HF wants int
                rope_scaling["original_max_position_embeddings"] = int(rope_scaling["original_max_position_embeddings"])
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        out = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.model_type == "mistral":
            out["sliding_window"] = None
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        return out


def _llama3_inv_freq(inv: np.ndarray, s: dict[str, float]) -> np.ndarray:
    """Llama 3.1 frequency smoothing: long wavelengths are divided by `factor`, short ones kept,
    the band between interpolated (Meta's reference implementation; every number from the config)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_settings(hf: dict[str, Any]) -> tuple[float, str, tuple[tuple[str, float], ...]]:
    """(theta, rope type, scaling params) from either spelling: `rope_theta` + `rope_scaling`
    (checkpoints on the hub) or `rope_parameters` (what transformers 5 writes)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedConfigError("rope_parameters: per-layer-type rope parameters are not supported")
    scaling = dict(params or hf.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = hf.get("rope_theta", 10000.0)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    where = "rope_parameters" if params else "rope_scaling"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{where}.rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "linear":
        keep = {"factor": float(scaling["factor"])}
    elif rope_type == "llama3":
        missing = [k for k in _LLAMA3_KEYS if k not in scaling]
        if missing:
            raise UnsupportedConfigError(f"{where}: llama3 rope scaling needs {missing}")
        keep = {k: float(scaling[k]) for k in _LLAMA3_KEYS}
    else:
        keep = {}
    return float(theta), rope_type, tuple(sorted(keep.items()))


def config_from_hf(hf: dict[str, Any], **dtype_policy: str) -> ModelConfig:
    """Build a `ModelConfig` from the dict of a Hugging Face `config.json`.

    `dtype_policy` may set `param_dtype` and `dtype` (default float32 for both).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise UnsupportedConfigError("mlp_bias=true is not supported")
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        sliding = hf.get("sliding_window")
    if sliding is not None:
        raise UnsupportedConfigError(f"sliding_window={sliding} is not supported (attention is always full)")
    missing = [k for k in _REQUIRED_KEYS if k not in hf]
    if missing:
        raise UnsupportedConfigError(
            f"config.json lacks {missing}, which a {model_type} config always has; the file is incomplete: "
            "copy it again from the model's source"
        )
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError(f"partial_rotary_factor={hf['partial_rotary_factor']} is not supported")
    N = hf["num_attention_heads"]
    theta, rope_type, rope_scaling = _rope_settings(hf)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    # qwen2 always has q/k/v biases; llama declares them with `attention_bias`.
    bias = True if model_type == "qwen2" else bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=N,
        num_key_value_heads=hf.get("num_key_value_heads") or N,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // N,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_scaling=rope_scaling,
        attention_bias=bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # transformers' default for all three
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        **dtype_policy,
    )


def load_hf_config(path: str | Path, **dtype_policy: str) -> ModelConfig:
    """Read `config.json` from a model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist: a Hugging Face model directory has a config.json")
    try:
        hf = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedConfigError(
            f"{file}: not a UTF-8 JSON file ({e}); copy it again from the model's source"
        ) from None
    return config_from_hf(hf, **dtype_policy)
