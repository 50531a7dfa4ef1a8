"""`python tests/audit_writes.py DIR MODULE ARGS...`: run MODULE as `python -m MODULE ARGS...` would,
and at exit print one line `WRITES [paths]`: every path under DIR that this process opened for
writing, created, renamed, truncated or removed. Python's audit hooks see these, so writes made by
C++ code (TensorStore's) are not listed; nor is a mkdir of a directory that exists (it changes
nothing). tests/test_multihost.py uses it to show that only the writer writes.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"os.rename": 2, "os.remove": 1, "os.rmdir": 1, "shutil.rmtree": 1, "os.truncate": 1}  # paths: first n args


def main() -> None:
    root, module, args = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3:]
    touched: set[str] = set()

    def note(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path == root or path.startswith(root + os.sep):
                touched.add(os.path.relpath(path, root))

    def hook(event: str, event_args: tuple) -> None:
        if event == "open":
            path, mode, flags = event_args
            if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
                note(path)
        elif event == "os.mkdir":
            if not os.path.isdir(event_args[0]):
                note(event_args[0])
        elif event in EVENTS:
            for path in event_args[: EVENTS[event]]:
                note(path)

    atexit.register(lambda: print("WRITES " + json.dumps(sorted(touched)), flush=True))
    sys.addaudithook(hook)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
