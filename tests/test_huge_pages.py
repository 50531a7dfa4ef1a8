"""Huge pages for XLA's host buffers: when a command restarts itself with glibc's tunable, and that it does."""

import subprocess
import sys
from pathlib import Path

import pytest

from lidr_jax.parallel import huge_pages
from lidr_jax.parallel.huge_pages import huge_pages_environment, restart_with_huge_pages, thp_mode

GLIBC = (2, 36)


def test_the_tunable_is_added_where_the_kernel_gives_huge_pages_on_request():
    env = huge_pages_environment({"PATH": "/bin"}, "madvise", GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_the_users_other_tunables_are_kept():
    env = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, mode, glibc",
    [
        ({}, "always", GLIBC),  # the kernel backs all memory with huge pages already
        ({}, "never", GLIBC),  # the kernel refuses them
        ({}, None, GLIBC),  # no transparent huge pages at all
        ({}, "madvise", (2, 34)),  # glibc before the tunable
        ({}, "madvise", None),  # another C library
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),  # the user's choice
        ({"LIDR_JAX_HUGE_PAGES": "0"}, "madvise", GLIBC),  # turned off
    ],
)
def test_no_restart_where_it_changes_nothing_or_the_user_chose(environ, mode, glibc):
    assert huge_pages_environment(environ, mode, glibc) is None


def test_the_kernels_mode_is_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert thp_mode(str(path)) == "madvise"
    assert thp_mode(str(tmp_path / "absent")) is None


def test_the_restart_runs_the_same_command_with_the_tunable(monkeypatch):
    calls = []
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(huge_pages, "glibc_version", lambda: GLIBC)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LIDR_JAX_HUGE_PAGES", raising=False)
    restart_with_huge_pages(execv=lambda *a: calls.append(a))
    ((executable, argv, env),) = calls
    assert (executable, argv, env["GLIBC_TUNABLES"]) == (sys.executable, sys.orig_argv, "glibc.malloc.hugetlb=1")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # after the restart: no second one
    restart_with_huge_pages(execv=lambda *a: calls.append(a))
    assert len(calls) == 1
    monkeypatch.delenv("GLIBC_TUNABLES")

    def refused(*a):
        raise PermissionError(13, "Permission denied")

    restart_with_huge_pages(execv=refused)  # the command goes on without huge pages


@pytest.mark.skipif(
    huge_pages_environment({}, thp_mode(), huge_pages.glibc_version()) is None,
    reason="this machine's kernel or C library gives nothing to restart for (not madvise, or not glibc >= 2.35)",
)
def test_a_process_restarts_itself_once_with_the_tunable():
    code = (
        "import os\nfrom lidr_jax.parallel.huge_pages import restart_with_huge_pages\n"
        "print('start', flush=True)\nrestart_with_huge_pages()\nprint(os.environ['GLIBC_TUNABLES'])"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines() == ["start", "start", "glibc.malloc.hugetlb=1"]
