"""Progress of the long loops (generation, scoring, training) on stderr.

On a terminal or in a notebook: a tqdm bar, redrawn in place. In a log (stderr redirected to a file or
a pipe, as under nohup, a scheduler or a test's capture) a redrawn bar becomes one line per redraw and a
repeated last line, so there it is a plain line at most every `every` seconds and one final line when
the loop ends: a log holds one final progress line per loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm.auto import tqdm

LOG_EVERY_S = 30.0


def progress(
    total: int,
    desc: str,
    unit: str,
    *,
    enabled: bool = True,
    initial: int = 0,
    every: float = LOG_EVERY_S,
    file: TextIO | None = None,
):
    """A progress bar with tqdm's `update(n)`, `set_postfix(**values)` and `close()` (module docstring).
    `file`: default stderr, as it is at the call."""
    if not enabled:
        return LogProgress(total, desc, unit, initial=initial, every=every, file=file, silent=True)
    stream = file if file is not None else sys.stderr
    if _interactive(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream)
    return LogProgress(total, desc, unit, initial=initial, every=every, file=stream)


def _interactive(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


class LogProgress:
    """A loop's progress as whole lines: `desc: n/total units [elapsed, rate units/s, key=value ...]`, at most
    one every `every` seconds while it runs, and the final one at `close()` (once). `silent`: nothing."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        initial: int = 0,
        every: float = LOG_EVERY_S,
        file: TextIO | None = None,
        silent: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.file, self.silent, self.clock = every, file, silent, clock
        self.start = self.last = clock()
        self.initial = initial
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every and self.n < self.total:
            self._write(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(self.clock())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, now: float) -> str:
        elapsed = now - self.start
        done = self.n - self.initial
        rate = f", {done / elapsed:.3g} {self.unit}/s" if elapsed > 0 and done > 0 else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {self.n}/{self.total} {self.unit} [{_clock(elapsed)}{rate}{extra}]"

    def _write(self, now: float) -> None:
        self.last = now
        if self.silent:
            return
        stream = self.file if self.file is not None else sys.stderr
        print(self.line(now), file=stream, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
