"""Transparent huge pages for the host memory XLA allocates, asked of glibc's malloc at process start.

XLA:CPU takes each program's buffers from malloc, and glibc serves every block over 32 MB with a fresh
mmap that it returns on free. A DPO step at real lengths allocates GBs of such blocks per step, so every
step first-touches them again in 4 KiB pages (the page faults and kernel time measured: BENCHMARKS.md,
"DPO", "Host memory: page faults"). Where the kernel gives huge pages only on request
(`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise`, the common default), glibc >= 2.35 asks
for them when started with the tunable `glibc.malloc.hugetlb=1`.

glibc reads its tunables once, when the process starts, so the commands that run XLA's large programs
(`python -m lidr_jax.iterate`, `dpo`, `evaluate`) start themselves again with the tunable added, once,
before any import of JAX (`restart_with_huge_pages`). Nothing changes where the kernel already uses huge pages for all
memory (`always`), refuses them (`never`), the C library is not glibc >= 2.35, the user set the
tunable themselves, or `LIDR_JAX_HUGE_PAGES=0`.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (the bracketed word: always, madvise, never), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def huge_pages_environment(environ, mode: str | None, glibc: tuple[int, int] | None) -> dict[str, str] | None:
    """The environment to restart with, or None where a restart changes nothing (see the module doc)."""
    if environ.get("LIDR_JAX_HUGE_PAGES") == "0" or mode != "madvise":
        return None
    if glibc is None or glibc < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:  # the user's own choice, or this restart already happened
        return None
    new = dict(environ)
    new["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return new


def restart_with_huge_pages(execv=os.execve) -> None:
    """Start this command again (same interpreter, same arguments, same process id) with glibc asking for
    huge pages, where that helps; return where it does not. Call first thing in a command's `__main__`."""
    if sys.platform != "linux" or not getattr(sys, "orig_argv", None):
        return
    environ = huge_pages_environment(os.environ, thp_mode(), glibc_version())
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            execv(sys.executable, sys.orig_argv, environ)
        except OSError:  # the interpreter cannot be started again (e.g. a user who may not exec it): go on as is
            return
