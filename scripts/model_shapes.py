"""Architectures the benchmarks and the memory plan instantiate with random weights: the values of
each model's Hugging Face config.json, spelled once. Each is a dict of `ModelConfig` fields.

`python -m scripts.model_shapes LLAMA_3_8B DIR` writes DIR/config.json (no weights): what
`python -m lidr_jax.plan --set model=DIR` needs to compile a run's programs at that model's shapes.
"""

import json
import sys
from pathlib import Path

LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
LLAMA_3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
LLAMA_3_70B = dict(
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
SMOLLM2_135M = dict(  # the embedded default's architecture (bench_dpo.py --kernel)
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TINY = dict(  # the same code paths in seconds (a dry run of a GPU script on this CPU)
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)


def write_config_dir(shape: dict, directory) -> Path:
    """`directory`/config.json for `shape`, as a Llama checkpoint's (no weights); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = dict(shape, architectures=["LlamaForCausalLM"], model_type="llama", eos_token_id=2)
    (directory / "config.json").write_text(json.dumps(arch, indent=1) + "\n")
    return directory


if __name__ == "__main__":
    name, out = sys.argv[1:3]
    print(write_config_dir(globals()[name], out))
