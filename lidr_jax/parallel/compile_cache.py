"""JAX's persistent compilation cache: executables compiled once are read back from disk by later
stages and later runs (an iteration's training step, compiled again for each iteration's new optimizer,
is the same program; a rerun of the same config compiles nothing it compiled before).

`compilation_cache: auto` (the run config's default) keeps it in `$XDG_CACHE_HOME/lidr_jax/jax`
(`~/.cache/lidr_jax/jax` when unset); a path puts it there; null turns it off. It is only a cache:
deleting it costs compilation time, never a result.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_dir(setting: str | None) -> str | None:
    """Where `setting` puts the cache (None: off)."""
    if setting is None or setting in ("", "off"):
        return None
    if setting == "auto":
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return str(Path(base) / "lidr_jax" / "jax")
    return setting


def enable_compilation_cache(setting: str | None) -> str | None:
    """Turn JAX's persistent compilation cache on at `cache_dir(setting)` for this process; returns the
    directory (None: left off). Call before the first compilation."""
    path = cache_dir(setting)
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Every executable, however quick to compile: on a CPU the many small ones add up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
