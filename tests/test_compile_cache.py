"""The run's persistent compilation cache setting (lidr_jax/parallel/compile_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

from lidr_jax.parallel.compile_cache import cache_dir
from lidr_jax.pipeline.config import load_run_config


def test_cache_dir_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("auto") == str(tmp_path / "xdg" / "lidr_jax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir("auto") == str(Path.home() / ".cache" / "lidr_jax" / "jax")
    assert cache_dir("/data/jax-cache") == "/data/jax-cache"
    assert cache_dir(None) is None and cache_dir("off") is None
    assert load_run_config().compilation_cache == "auto"
    assert load_run_config(overrides=["compilation_cache=null"]).compilation_cache is None


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
    """Two processes jit the same program: the first writes the cache entry, the second compiles nothing
    (JAX's cache-miss counter stays 0)."""
    script = (
        "import sys, jax, jax.numpy as jnp\n"
        "from jax._src import monitoring\n"
        "from lidr_jax.parallel.compile_cache import enable_compilation_cache\n"
        "misses = []\n"
        "monitoring.register_event_listener(lambda e, **k: misses.append(e) if e.endswith('cache_misses') else None)\n"
        "enable_compilation_cache(sys.argv[1])\n"
        "jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((8, 8))).block_until_ready()\n"
        "print(len(misses))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    cache = tmp_path / "cache"
    runs = [
        subprocess.run([sys.executable, "-c", script, str(cache)], env=env, capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr[-2000:]
    first, second = (int(r.stdout.split()[-1]) for r in runs)
    assert first >= 1 and second == 0
    assert any(p.name.endswith("-cache") for p in cache.iterdir())
