"""Shared fixtures: tiny random Hugging Face models and a tiny chat tokenizer, saved to temp dirs.

Reuse these instead of building your own (all are offline and take well under a second each after the
first torch import):

- `tiny_tokenizer` (session): a `lidr_jax.formats.tokenizer.ChatTokenizer` over a character-level vocabulary of
  `TINY_VOCAB` = 160 ids: ids 0-3 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (eos), `<unk>`;
  then printable ASCII, newline, some accented Latin, Cyrillic and CJK characters. Encoding is one id
  per character and decoding is exact, so text round-trips. It has a ChatML chat template (SmolLM2's,
  without the default system prompt). No BOS is added.
- `make_hf_model(model_type="llama", *, seed=0, torch_dtype="float32", max_shard_size=None,
  generation_eos=None, **config_overrides) -> Path` (session): builds a random
  `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` (width 64, 2 layers, 4 heads, 2 kv
  heads, vocab 160 unless overridden), randomises its norm weights and biases (HF initialises them to
  ones/zeros, which would hide a swapped or dropped tensor), and saves it with `save_pretrained` plus the
  tiny tokenizer and a generation_config.json. `load_pretrained(path)` works on the result. Same
  arguments -> the same cached directory. `max_shard_size="50KB"` writes a sharded checkpoint.
- `tiny_llama_dir` (GQA, tied embeddings), `tiny_qwen2_dir` (q/k/v biases, untied): common cases.
- `tiny_model`: `lidr_jax.formats.load.load_pretrained(tiny_llama_dir)`, a ready `Model`.
- `torch_model(path)`: the transformers model of a saved directory, float32, eval mode (imports torch).
- `install_wheel(tmp_path) -> Path`: builds a wheel from the checkout and unpacks it as pip installs it;
  returns the folder to put on PYTHONPATH (nothing of the checkout is on it).

torch is imported lazily, inside the fixtures, so tests that do not need it do not pay for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

# The tests run on the CPU. With libtpu installed (the tpu extra, for lidr_jax.plan) JAX would otherwise
# probe for a TPU when it starts (lidr_jax.parallel.topology.skip_absent_tpu says why); set before any
# test module imports jax, and inherited by the tests' subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TINY_VOCAB = 160
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_EXTRA_CHARS = "éèàçüöäßñ" + "абвгдеёжзийклмнопрстуфхцчшщъыьэюя" + "你好世界中文"

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# The runs' persistent compilation cache (compilation_cache: auto -> $XDG_CACHE_HOME/lidr_jax/jax) goes to a
# folder of this test session, shared by its subprocesses, never the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lidr_jax_tests_cache_")


def install_wheel(tmp_path: Path) -> Path:
    """A non-editable install of the checkout: the wheel pip would build, unpacked into tmp_path/site."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(REPO_ROOT / "lidr_jax", src / "lidr_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("lidr_jax-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    shutil.rmtree(src)  # nothing of the checkout is left to fall back on
    return site


def build_tiny_hf_tokenizer():
    """A transformers fast tokenizer: one token per character, specials matched whole."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"] + list(_EXTRA_CHARS)
    tokens = list(SPECIAL_TOKENS) + chars
    tokens += [f"<extra_{i}>" for i in range(TINY_VOCAB - len(tokens))]
    assert len(tokens) == TINY_VOCAB, len(tokens)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters with no separator
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lidr_jax.formats.tokenizer import ChatTokenizer

    return ChatTokenizer(build_tiny_hf_tokenizer())


_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
_BASE = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "bos_token_id": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
    "initializer_range": 0.08,  # larger than HF's 0.02 so logits are O(1) and layout bugs show plainly
}


def build_tiny_hf_model(model_type: str = "llama", *, seed: int = 0, **config_overrides):
    """A random transformers causal LM (float32) with randomised norm weights and biases."""
    import torch
    import transformers

    kwargs = dict(_BASE, **config_overrides)
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", None)
    config = getattr(transformers, _CONFIG_CLASSES[model_type])(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def make_hf_model(tmp_path_factory):
    """Factory: build, save and cache a tiny random HF model directory (see the module docstring)."""
    cache: dict[str, Path] = {}

    def make(
        model_type: str = "llama",
        *,
        seed: int = 0,
        torch_dtype: str = "float32",
        max_shard_size: str | None = None,
        generation_eos=None,
        **config_overrides,
    ) -> Path:
        import torch

        key = json.dumps(
            [model_type, seed, torch_dtype, max_shard_size, generation_eos, config_overrides],
            sort_keys=True,
            default=str,
        )
        if key in cache:
            return cache[key]
        out = tmp_path_factory.mktemp(f"tiny_{model_type}")
        model = build_tiny_hf_model(model_type, seed=seed, **config_overrides)
        if torch_dtype != "float32":
            model = model.to(getattr(torch, torch_dtype))
        if generation_eos is not None:
            model.generation_config.eos_token_id = generation_eos
        save = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, **save)
        build_tiny_hf_tokenizer().save_pretrained(out)
        cache[key] = out
        return out

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(make_hf_model) -> Path:
    """Llama, GQA (4 heads, 2 kv heads), tied embeddings, generation_config eos [2, 0]."""
    return make_hf_model("llama", tie_word_embeddings=True, generation_eos=[2, 0])


@pytest.fixture(scope="session")
def tiny_qwen2_dir(make_hf_model) -> Path:
    """Qwen2 with q/k/v biases (randomised), untied embeddings."""
    return make_hf_model("qwen2")


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir):
    from lidr_jax.formats.load import load_pretrained

    return load_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def torch_model():
    """Load a saved directory with transformers, float32, eval mode."""

    def load(path):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    return load
