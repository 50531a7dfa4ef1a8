"""Export to a Hugging Face model directory that transformers and vLLM load as they are.

    export_hf(model, "out/hf")                                   # a loaded Model
    export_hf(params, "out/hf", config=config, tokenizer=tok)    # params restored from a checkpoint
    python -m lidr_jax.export RUN_DIR [--iteration K] --out DIR  # a run's trained policy
    python -m lidr_jax.export smollm2-135m-instruct --out DIR    # also a .gguf file or an HF directory

The directory holds safetensors weights (one `model.safetensors`, or shards of at most
`max_shard_size` with `model.safetensors.index.json`), `config.json` (architecture fields from
`ModelConfig.to_hf_dict`, plus `torch_dtype`/`dtype`), `generation_config.json` naming every
end-of-turn id (so generation stops at `<|im_end|>` as well as at the tokenizer's EOS), and the
tokenizer files with the chat template. Tensor names and layouts come from `lidr_jax.formats.hf_table`, the
one table import also uses; tied embeddings are written once. Exporting a GGUF model therefore gives a
normal HF directory. The directory is written beside its destination and renamed into place, so an
interrupted export never leaves a half-written model under `out_dir`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lidr_jax.formats.hf_table import hf_from_params, hf_names
from lidr_jax.model.config import ModelConfig

EXPORT_DTYPES = ("bfloat16", "float32")
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


def _to_host(x, dtype: np.dtype) -> np.ndarray:
    """One parameter on the host in the export dtype (gathered across hosts if it is sharded there)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x).astype(dtype, copy=False)


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
    eos = set(config.eos_token_ids)
    old = gen.get("eos_token_id")
    eos |= set(old if isinstance(old, (list, tuple)) else [] if old is None else [old])
    if tokenizer is not None:
        eos |= set(tokenizer.eos_token_ids)
    eos_list = sorted(int(i) for i in eos)
    if eos_list:
        gen["eos_token_id"] = eos_list if len(eos_list) > 1 else eos_list[0]
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
) -> Path:
    """Write a Hugging Face model directory to `out_dir` (replacing one already there); returns its path.

    `model_or_params` is a `lidr_jax.formats.load.Model` (config, tokenizer and generation config come from it
    unless given) or a params pytree, which then needs `config` (e.g. from
    `lidr_jax.train.checkpoint.restore_params`). `tokenizer` is a `ChatTokenizer`; without one the directory
    has no tokenizer files. `dtype`: "bfloat16" (half the size; what vLLM serves) or "float32" (exact).
    On several hosts every process must call this (sharded params are gathered); process 0 writes.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {EXPORT_DTYPES}")
    if hasattr(model_or_params, "params") and hasattr(model_or_params, "config"):
        model = model_or_params
        params, config = model.params, config or model.config
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
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    # Cast to the export dtype on the host first, so the layout changes below copy half as much.
    host = jax.tree.map(lambda x: _to_host(x, np_dtype), params)
    out_dir = Path(out_dir).absolute()
    if jax.process_index() != 0:
        return out_dir
    tensors = hf_from_params(host, config)
    order = hf_names(config)
    assert sorted(order) == sorted(tensors), "weights table and hf_from_params disagree"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_weights(tmp, tensors, order, max_bytes)
        (tmp / "config.json").write_text(json.dumps(_hf_config(config, tokenizer, dtype), indent=2) + "\n")
        gen = _generation_config(config, tokenizer, generation_config)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.hf.save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_weights(directory: Path, tensors: Mapping[str, np.ndarray], order: list[str], max_bytes: int) -> None:
    from safetensors.numpy import save_file

    groups = _shards(tensors, order, max_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format
    if len(groups) == 1:
        save_file({n: tensors[n] for n in groups[0]}, str(directory / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(directory / file), metadata=metadata)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` to `out_dir`; an existing `out_dir` is swapped out, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- CLI


def model_from_run(run_path: str | os.PathLike, iteration: int | None = None):
    """The `Model` a run produced: iteration K's trained policy (default: the last trained one) with
    the run's base model tokenizer and generation config. Iteration 0 is the base model itself."""
    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.pipeline.run_dir import RunDir
    from lidr_jax.train.checkpoint import restore_params

    run = RunDir(run_path)
    k = run.last_iteration_with("train") if iteration is None else iteration
    if k is None:
        raise SystemExit(
            f"{run.path} has no finished training stage yet; nothing to export "
            "(pass --iteration 0 to export the run's starting model)"
        )
    base_name = run.config.get("model") or run.iteration_start_model(min(run.iterations()))
    base = load_pretrained(base_name)
    if k == 0:
        return base
    policy = run.outputs(k, "train")["policy"]  # raises StageNotDoneError naming the stage
    params, config = restore_params(policy)
    return dataclasses.replace(base, params=params, config=config, source=f"{run.path} iteration {k}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lidr_jax.export",
        description="Export a model to a Hugging Face directory (safetensors, config, generation config, "
        "tokenizer with chat template) that transformers and vLLM load.",
    )
    p.add_argument(
        "source",
        help="a run directory (has manifest.json), a Hugging Face model directory, "
        "a .gguf file, or an embedded model name (smollm2-135m-instruct)",
    )
    p.add_argument(
        "--iteration",
        type=int,
        default=None,
        help="run directories only: the iteration whose trained policy to export "
        "(default: the last trained; 0 = the run's starting model)",
    )
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="bfloat16", help="weight dtype (default bfloat16)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    args = p.parse_args(argv)

    from lidr_jax.formats.load import load_pretrained
    from lidr_jax.pipeline.run_dir import MANIFEST

    if (Path(args.source) / MANIFEST).exists():
        model = model_from_run(args.source, args.iteration)
    else:
        if args.iteration is not None:
            p.error("--iteration applies only to a run directory (one with manifest.json)")
        model = load_pretrained(args.source)
    out = export_hf(model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    files = sorted(f.name for f in out.iterdir())
    print(f"exported {model.source} ({args.dtype}) to {out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
