"""Export to a Hugging Face model directory that transformers and vLLM load as they are.

    export_hf(model, "out/hf")                                   # a loaded Model
    export_hf(params, "out/hf", config=config, tokenizer=tok)    # params restored from a checkpoint
    python -m lidr_jax.export RUN_DIR [--iteration K] --out DIR  # a run's trained policy (lidr_jax.pipeline.export_run)
    python -m lidr_jax.export smollm2-135m-instruct --out DIR    # also a .gguf file or an HF directory

The directory holds safetensors weights (one `model.safetensors`, or shards of at most
`max_shard_size` with `model.safetensors.index.json`), `config.json` (architecture fields from
`ModelConfig.to_hf_dict`, plus `torch_dtype`/`dtype`), `generation_config.json` naming every
end-of-turn id (so generation stops at `<|im_end|>` as well as at the tokenizer's EOS), the
tokenizer files with the chat template, a `README.md` model card (base model, method, iteration,
languages, training data, per-language numbers: `model_card`), and `lidr_jax_export.json`, the mark
that says lidr_jax wrote the directory and which files it holds. Tensor names and layouts come from
`lidr_jax.formats.hf_table`, the one table import also uses; tied embeddings are written once.
Exporting a GGUF model therefore gives a normal HF directory.

Nothing of the user's is ever lost (`check_destination`, run before any model work by the command):
the destination must not exist, be an empty folder, or be an earlier lidr_jax export (replaced only
when `replace=True`; the command's `--force`) that holds no file the export did not write. A file, the
source or a folder holding it, and any other non-empty folder are refused. The directory is written to
a temporary folder beside its destination and renamed into place, so an interrupted export never
leaves a half-written model under `out_dir`; the temporary folder is removed on any failure, and one
left by a killed export (its name holds the host and process id) is removed by the next export beside it.
Every file gets the process umask's permissions (`lidr_jax.files.atomic_write_bytes`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import gguf
import jax
import numpy as np
from safetensors.numpy import save as safetensors_bytes

from lidr_jax.files import as_path, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from lidr_jax.formats.hf_table import hf_from_params, hf_names
from lidr_jax.formats.load import EMBEDDED_MODELS, embedded_model_path
from lidr_jax.formats.tokenizer import end_of_sequence_ids
from lidr_jax.model.config import ModelConfig
from lidr_jax.parallel.sharding import to_host

EXPORT_DTYPES = ("bfloat16", "float32")
ExportDtype = Literal[EXPORT_DTYPES]  # the settings' type: a Literal of a tuple is a Literal of its items
EXPORT_MARK = "lidr_jax_export.json"  # written last: its presence says lidr_jax wrote the directory
MODEL_CARD = "README.md"
CONVERSION = "none: a format conversion by lidr_jax, no training"
CARD_KEYS = ("base_model", "method", "iteration", "languages", "training_pairs", "per_language", "held_out", "run")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


class ExportError(ValueError):
    """The export destination is refused (it would lose data) or cannot be written."""


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "2GB", "500MB", "1GiB" (GB = 10^9, as transformers reads it)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size={size!r} is not a size; write e.g. 2GB, 500MB, 1GiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


# ------------------------------------------------------------------------------------ destination


def _read_mark(directory: Path) -> dict | None:
    """The export mark of `directory`, or None when it has none (or one that is not ours)."""
    try:
        mark = json.loads((directory / EXPORT_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(mark, dict) or mark.get("written_by") != "lidr_jax" or not isinstance(mark.get("files"), list):
        return None
    return mark


def _listing(names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_destination(
    out_dir: str | os.PathLike, *, sources: Iterable[str | os.PathLike] = (), replace: bool = False
) -> Path:
    """The resolved destination of an export, or an `ExportError` saying why it is refused.

    Refused: a file; a folder that is, or holds, one of `sources` (what is being exported: a model
    directory or file, a run directory); a non-empty folder without lidr_jax's export mark; an earlier
    export that holds files it did not write; an earlier export when `replace` is False. First
    clears what killed exports left beside the destination (`remove_stale_temps`); reads only
    listings and the export mark, so a command runs it before loading anything.
    """
    out = Path(out_dir).expanduser().absolute()
    real = out.resolve()
    remove_stale_temps(real)
    for src in sources:
        src_real = Path(src).expanduser().absolute().resolve()
        if real == src_real or real in src_real.parents:
            what = "is the source" if real == src_real else f"holds the source {src_real}"
            raise ExportError(
                f"export destination {out} {what}; writing there would delete it. Nothing was written: "
                f"choose a new folder, e.g. {src_real.parent / (src_real.name + '-hf')}"
            )
    if real.exists() and not real.is_dir():
        raise ExportError(
            f"export destination {out} is a file, not a folder; nothing was written: "
            "choose a folder that does not exist yet (or an empty one)"
        )
    if not real.is_dir():
        return real
    entries = [p.name for p in real.iterdir()]
    if not entries:
        return real
    mark = _read_mark(real)
    if mark is None:
        raise ExportError(
            f"export destination {out} is a folder that holds {_listing(entries)} and is not an earlier lidr_jax "
            "export; nothing was written: choose a new or empty folder"
        )
    foreign = set(entries) - set(mark["files"]) - {EXPORT_MARK}
    if foreign:
        raise ExportError(
            f"export destination {out} is an earlier lidr_jax export but also holds {_listing(foreign)}, which the "
            "export did not write; nothing was written: move those out or choose a new folder"
        )
    if not replace:
        raise ExportError(
            f"export destination {out} holds an earlier lidr_jax export; nothing was written: pass --force "
            "(export_hf(..., replace=True)) to replace it, or choose a new folder"
        )
    return real


def _temp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.lidr-export-{socket.gethostname()}-"


def _alive(process_id: int) -> bool:
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Remove the temporary folders of exports to `out_dir` from this host whose process is gone (a
    killed export leaves one); returns what was removed. An earlier export set aside by an export
    killed just before its final rename is put back where it was, if nothing took its place. Another
    host's folders are left alone."""
    prefix = _temp_prefix(out_dir)
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for p in sorted(out_dir.parent.iterdir()):
        m = re.fullmatch(r"(\d+)\.(tmp|old)", p.name[len(prefix) :]) if p.name.startswith(prefix) else None
        if not m or not p.is_dir() or p.is_symlink() or _alive(int(m.group(1))):
            continue
        if m.group(2) == "old" and not out_dir.exists():
            os.replace(p, out_dir)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------ model card


def _yaml_list(key: str, values: Iterable[str]) -> list[str]:
    values = list(values)
    return [f"{key}:", *(f"- {json.dumps(str(v))}" for v in values)] if values else []


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"  # NaN: nothing measured
    return str(value).replace("|", "\\|").replace("\n", " ")


def _hub_id(name: str) -> bool:
    """A Hugging Face hub id ("org/name") rather than a local path or an embedded model name."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


# The embedded models' hub ids (their GGUF files are quantizations of these checkpoints).
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _gguf_quantization(file: Path) -> str | None:
    """The GGUF file type of `file` ("Q4_1", "F16", ...) from its metadata, or None when unreadable."""
    try:
        field = gguf.GGUFReader(str(file)).fields.get("general.file_type")
        return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_") if field else None
    except Exception:  # a card never fails over a detail: the row is left out
        return None


def _shown_path(path: str) -> str:
    """A path as a card shows it: relative paths as given, absolute ones by their last three parts (a card
    travels to other machines, where this machine's folders mean nothing)."""
    p = Path(path)
    return path if not p.is_absolute() else "/".join(p.parts[-3:])


def describe_base(base: str) -> dict[str, str]:
    """What a card says about the model a checkpoint came from: `name` (shown), `hub_id` (when known:
    an embedded model's checkpoint, a hub id itself, a directory whose config.json or card names one)
    and `weights` (how its weights were stored: a GGUF file's quantization)."""
    base = base.split(" (")[0]  # "smollm2-135m-instruct (/path/file.gguf)": the name
    out: dict[str, str] = {"name": base}
    file: Path | None = None
    if base in EMBEDDED_HUB_IDS:
        out["hub_id"] = EMBEDDED_HUB_IDS[base]
        out["name"] = (
            f"{base} (the embedded {EMBEDDED_MODELS[base][2]}, from the PyPI package {EMBEDDED_MODELS[base][0]})"
        )
        try:
            file = embedded_model_path(base)
        except FileNotFoundError:
            file = None
    elif _hub_id(base):
        out["hub_id"] = base
    else:
        path = Path(base).expanduser()
        out["name"] = _shown_path(base)
        if path.suffix == ".gguf":
            file = path
        elif path.is_dir():
            hub = _hub_id_of_dir(path)
            if hub:
                out["hub_id"] = hub
    if file is not None and file.is_file():
        quant = _gguf_quantization(file)
        if quant:
            out["weights"] = (
                f"GGUF {quant} ({'4-bit' if quant.startswith('Q4') else quant}), dequantized to float32 by lidr_jax"
            )
    return out


def _hub_id_of_dir(path: Path) -> str | None:
    """A hub id a model directory names: an earlier lidr_jax export's card `base_model`, else config.json's
    `_name_or_path` when it is one."""
    try:
        card = (path / MODEL_CARD).read_text(encoding="utf-8")
        m = re.search(r'^base_model: "([^"]+)"$', card, re.M)
        if m:
            return m.group(1)
        name = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
        return name if isinstance(name, str) and _hub_id(name) else None
    except (OSError, ValueError):
        return None


def _column(values: list[Any]) -> list[str]:
    """One table column with one format: counts as integers, other numbers with the same decimals."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    if numbers and all(isinstance(v, int) for v in numbers):
        return [_fmt(v) for v in values]
    decimals = 3 if all(abs(v) < 10 for v in numbers) else 1
    return ["-" if v not in numbers else f"{v:.{decimals}f}" for v in values]


def held_out_card(held_out: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, list[float]]]:
    """The card's `held_out` entry from a check stage's recorded `held_out` numbers ({measure: {lang: v}},
    with `_low` / `_high` bounds): {lang: {measure name: [value, low, high]}} for the measures with an interval."""
    names = {
        "in_language": "in-language share",
        "change": "change since the start",
        "ref_loglik": "ref. log-lik / token",
    }
    out: dict[str, dict[str, list[float]]] = {}
    for key, name in names.items():
        for lang, v in (held_out.get(key) or {}).items():
            lo, hi = (held_out.get(f"{key}_low") or {}).get(lang), (held_out.get(f"{key}_high") or {}).get(lang)
            if v is not None and lo is not None and hi is not None:
                out.setdefault(lang, {})[name] = [float(v), float(lo), float(hi)]
        for lang, n in (held_out.get("n") or {}).items():
            if lang in out:
                out[lang]["prompts"] = [float(n)]
    return out


def model_card(card: Mapping[str, Any] | None, *, config: ModelConfig, source: str, dtype: str, num_params: int) -> str:
    """README.md of an export: YAML metadata the hub reads, then what the model is and how it was made.

    `card` (all keys optional, `CARD_KEYS`): base_model, method, iteration, languages, training_pairs
    (preference pairs of the iteration), per_language ({language: {column: number}}), held_out
    (`held_out_card`: measures with their 95% interval), run (the run directory). Without them the card
    names `source` as the base model and says the method was not recorded. The card holds no absolute
    path of this machine, and depends only on `card` and the checkpoint, so every export of one
    checkpoint writes the same card.
    """
    card = dict(card or {})
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ValueError(f"model card keys {unknown} are not known; the card takes {', '.join(CARD_KEYS)}")
    base = describe_base(str(card.get("base_model") or source))
    method = card.get("method") or "not recorded (the export was given no card information)"
    languages = [str(lang) for lang in card.get("languages") or []]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    front += _yaml_list("language", languages)
    if base.get("hub_id"):
        front.append(f"base_model: {json.dumps(base['hub_id'])}")
    trained = bool(card.get("iteration"))  # iteration 0 is a run's starting model
    front += _yaml_list("tags", ["lidr_jax", *(["dpo"] if trained else [])])
    front.append("---")
    iteration = card.get("iteration")
    title_name = base.get("hub_id", "").split("/")[-1] or Path(base["name"].split(" (")[0]).name
    title = f"{title_name} (lidr_jax" + (f", iteration {iteration})" if iteration is not None else " export)")
    rows = [("Base model", f"`{base['hub_id']}`" if base.get("hub_id") else f"`{base['name']}`")]
    if base.get("hub_id") and base["name"] != base["hub_id"]:
        rows.append(("Loaded from", base["name"]))
    if base.get("weights"):
        rows.append(("Base weights", base["weights"]))
    rows.append(("Method", method))
    if iteration is not None:
        rows.append(("Iteration", _fmt(iteration)))
    if languages:
        rows.append(("Languages", ", ".join(languages)))
    if card.get("training_pairs") is not None:
        rows.append(("Training data", f"{_fmt(card['training_pairs'])} preference pairs"))
    run = Path(str(card["run"])).name if card.get("run") else None
    if run:
        rows.append(("Run", f"`{run}`"))
    rows.append(
        (
            "Architecture",
            f"{config.model_type}, {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
            f"{num_params:,} parameters",
        )
    )
    rows.append(("Weights", f"{dtype} safetensors"))
    origin = f"`{_shown_path(source.split(' (')[0])}`"
    if run:  # a run's model has its base's source; the run says where it came from
        origin = f"the run `{run}`" + (f", iteration {iteration}" if iteration is not None else "")
    body = [f"# {title}", "", f"Exported by lidr_jax from {origin}.", "", "| | |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in rows]
    held: Mapping[str, Mapping[str, list]] = card.get("held_out") or {}
    if held:
        measures = list(dict.fromkeys(m for numbers in held.values() for m in numbers if m != "prompts"))
        body += ["", "## Held-out measurement" + (f" after iteration {iteration}" if iteration else ""), ""]
        body += [
            "On prompts never trained on, per language, with 95% bootstrap intervals over prompts "
            "(lidr_jax/eval/heldout.py).",
            "",
        ]
        body += ["| language | prompts | " + " | ".join(measures) + " |", "|---" * (len(measures) + 2) + "|"]
        for lang, numbers in held.items():
            cells = []
            for m in measures:
                if m not in numbers:
                    cells.append("-")
                    continue
                v, lo, hi = numbers[m]
                d, sign = (3, "") if "log-lik" in m else (2, "+" if "change" in m else "")
                cells.append(f"{v:{sign}.{d}f} [{lo:{sign}.{d}f}, {hi:{sign}.{d}f}]")
            n = numbers.get("prompts", [None])[0]
            body.append(f"| {lang} | {'-' if n is None else int(n)} | " + " | ".join(cells) + " |")
    per_language: Mapping[str, Mapping[str, Any]] = card.get("per_language") or {}
    if per_language:
        columns = list(dict.fromkeys(c for numbers in per_language.values() for c in numbers))
        where = f" of iteration {iteration}" if iteration is not None else ""
        body += ["", f"## Per-language numbers{where}", ""]
        body += ["| language | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        langs = list(per_language)
        cells = {c: _column([per_language[lang].get(c) for lang in langs]) for c in columns}
        for i, lang in enumerate(langs):
            body.append(f"| {lang} | " + " | ".join(cells[c][i] for c in columns) + " |")
    body += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "```",
        "",
        "The chat template and every end-of-turn id are in the tokenizer and generation config files.",
    ]
    return "\n".join(front + [""] + body) + "\n"


def _header_params(file) -> int:
    """Parameters in a safetensors file, from its JSON header (no tensor is read)."""
    with file.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(int(np.prod(t["shape"])) for name, t in header.items() if name != "__metadata__")


def refresh_card(out_dir: str | os.PathLike, card: Mapping[str, Any]) -> bool:
    """Write the model card of an existing lidr_jax export again with `card` (e.g. once its iteration's
    held-out check is done, so the run's own export says what a later re-export says). Returns whether
    there was an export to refresh."""
    out_dir = as_path(out_dir)
    if not (out_dir / EXPORT_MARK).exists() or not (out_dir / "config.json").exists():
        return False
    mark, hf = read_json(out_dir / EXPORT_MARK), read_json(out_dir / "config.json")
    if "num_params" not in mark:  # an export written before the mark held it: count from the safetensors headers
        mark["num_params"] = sum(_header_params(out_dir / name) for name in mark.get("weights", []))
    shape = SimpleNamespace(  # what the card's Architecture row reads
        model_type=hf.get("model_type", "llama"),
        num_hidden_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
    )
    text = model_card(card, config=shape, source=mark["source"], dtype=mark["dtype"], num_params=mark["num_params"])
    if (out_dir / MODEL_CARD).read_text(encoding="utf-8") != text:
        atomic_write_text(out_dir / MODEL_CARD, text)
    return True


# ------------------------------------------------------------------------------------ writing


def _shards(tensors: Mapping[str, np.ndarray], order: list[str], max_bytes: int) -> list[list[str]]:
    """Greedy split of tensor names, in order, into groups of at most `max_bytes` (a bigger tensor
    gets a group of its own, as transformers does)."""
    groups, current, size = [], [], 0
    for name in order:
        n = tensors[name].nbytes
        if current and size + n > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        groups.append(current)
    return groups


def _generation_config(config: ModelConfig, tokenizer, base: Mapping[str, Any] | None) -> dict[str, Any]:
    gen = {k: v for k, v in dict(base or {}).items() if not k.startswith("_") and k != "transformers_version"}
    eos_list = end_of_sequence_ids(tokenizer, config.eos_token_ids, gen.get("eos_token_id"))
    if eos_list:
        gen["eos_token_id"] = list(eos_list) if len(eos_list) > 1 else eos_list[0]
    if config.bos_token_id is not None:
        gen["bos_token_id"] = config.bos_token_id
    if tokenizer is not None:
        gen["pad_token_id"] = tokenizer.pad_token_id
    return gen


def _hf_config(config: ModelConfig, tokenizer, dtype: str) -> dict[str, Any]:
    out = config.to_hf_dict()
    if out.get("rope_scaling"):
        # ModelConfig keeps scaling numbers as floats; transformers and vLLM want this one an integer.
        scaling = dict(out["rope_scaling"])
        if "original_max_position_embeddings" in scaling:
            scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        out["rope_scaling"] = scaling
    if not config.eos_token_ids and tokenizer is not None and tokenizer.hf.eos_token_id is not None:
        out["eos_token_id"] = int(tokenizer.hf.eos_token_id)
    if tokenizer is not None:
        out["pad_token_id"] = tokenizer.pad_token_id
    # transformers 4 reads torch_dtype, transformers 5 dtype: write both.
    out.update(torch_dtype=dtype, dtype=dtype, use_cache=True)
    return out


def export_hf(
    model_or_params,
    out_dir: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    tokenizer=None,
    dtype: str = "bfloat16",
    max_shard_size: int | str = "2GB",
    generation_config: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Path:
    """Write a Hugging Face model directory to `out_dir`; returns its path.

    `model_or_params` is a `lidr_jax.formats.load.Model` (config, tokenizer and generation config come
    from it unless given) or a params pytree, which then needs `config` (e.g. from
    `lidr_jax.train.checkpoint.restore_params`). `tokenizer` is a `ChatTokenizer`; without one the
    directory has no tokenizer files. `dtype`: "bfloat16" (half the size; what vLLM serves) or
    "float32" (exact). `card`: what the model card says (`model_card`). `out_dir` is checked by
    `check_destination` (an earlier lidr_jax export there is replaced only if `replace`: the pipeline
    and the DPO command pass it for the folder they own, so a rerun after a kill can redo it), also
    against the model's source when that is a path. On several hosts every process must call this
    (sharded params are gathered); process 0 writes.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {EXPORT_DTYPES}")
    source = "params"
    if hasattr(model_or_params, "params") and hasattr(model_or_params, "config"):
        model = model_or_params
        params, config = model.params, config or model.config
        source = str(model.source)
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if generation_config is None:
            generation_config = getattr(model, "generation_config", None)
    else:
        params = model_or_params
        if config is None:
            raise ValueError(
                "export_hf(params, ...) needs config=ModelConfig (restore_params returns it with the params)"
            )
    max_bytes = parse_size(max_shard_size)
    sources = [source] if source != "params" and Path(source).exists() else []
    model_card(card, config=config, source=source, dtype=dtype, num_params=0)  # a bad card fails before any work
    if jax.process_count() == 1:  # several processes: checked after the gather, which every process must join
        check_destination(out_dir, sources=sources, replace=replace)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    # Cast to the export dtype on the host first, so the layout changes below copy half as much.
    host = jax.tree.map(lambda x: to_host(x).astype(np_dtype, copy=False), params)
    if jax.process_index() != 0:
        return Path(out_dir).expanduser().absolute()
    out_dir = check_destination(out_dir, sources=sources, replace=replace)  # only the writer's view counts
    tensors = hf_from_params(host, config)
    order = hf_names(config)
    assert sorted(order) == sorted(tensors), "weights table and hf_from_params disagree"
    num_params = int(sum(t.size for t in tensors.values()))

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f"{_temp_prefix(out_dir)}{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise ExportError(
            f"cannot create the export beside {out_dir}: {e.strerror or e}; choose a folder you can write to"
        ) from None
    try:
        written = _write_weights(tmp, tensors, order, max_bytes)
        atomic_write_json(tmp / "config.json", _hf_config(config, tokenizer, dtype))
        atomic_write_json(tmp / "generation_config.json", _generation_config(config, tokenizer, generation_config))
        if tokenizer is not None:
            tokenizer.hf.save_pretrained(str(tmp))
        text = model_card(card, config=config, source=source, dtype=dtype, num_params=num_params)
        atomic_write_text(tmp / MODEL_CARD, text)
        files = sorted(p.name for p in tmp.iterdir())
        mark = {"written_by": "lidr_jax", "source": source, "dtype": dtype, "weights": written, "files": files}
        mark["num_params"] = num_params  # refresh_card rewrites the card from the files alone
        atomic_write_json(tmp / EXPORT_MARK, mark)  # last: a directory with the mark is complete
        # Checked again just before the swap: a file put there while the weights were written is not lost.
        check_destination(out_dir, sources=sources, replace=replace)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_weights(directory: Path, tensors: Mapping[str, np.ndarray], order: list[str], max_bytes: int) -> list[str]:
    """The safetensors file(s) (and index) in `directory`; returns the weight file names."""
    groups = _shards(tensors, order, max_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format

    def write(file: str, names: list[str]) -> None:
        # Serialised in memory (one shard at a time) and written through the one atomic writer, which
        # gives the file the umask's permissions (safetensors' own save_file leaves it 0600).
        atomic_write_bytes(directory / file, safetensors_bytes({n: tensors[n] for n in names}, metadata=metadata))

    if len(groups) == 1:
        write("model.safetensors", groups[0])
        return ["model.safetensors"]
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write(file, names)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    atomic_write_json(directory / "model.safetensors.index.json", index)
    return sorted(set(weight_map.values()))


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` to `out_dir`. An earlier export there is first renamed aside (a name
    `remove_stale_temps` recognises if this process dies before deleting it), then deleted; an empty
    folder is replaced by the rename itself."""
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.parent / f"{_temp_prefix(out_dir)}{os.getpid()}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:  # put the earlier export back
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
