"""Files every layer writes and reads: atomic writes, JSON Lines, dataclass trees as JSON.

An atomic write goes to a temporary file in the destination's directory, is fsynced, then renamed
over the destination (and the directory fsynced), so a reader or a resumed run sees the old file or
the new one, never half of one. The file gets the process umask's permissions, as `open` would give it
(`tempfile.mkstemp` alone would leave every file 0600).

Paths may also name an object store that etils.epath (installed with Orbax) writes: `gs://bucket/run`,
`s3://...`. `as_path` gives such a URI as an `epath.Path` and a local path as a `pathlib.Path`, so local
files keep pathlib's behaviour exactly. On an object store a write goes through epath and is atomic
because an object appears only once its upload completes; an object cannot be appended to, so
`append_jsonl` rewrites it whole (the rows so far plus the new ones).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from etils import epath

AnyPath = Path | epath.Path
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on this machine's filesystem (not a `scheme://` URI such as gs://bucket/run)."""
    return not _URI.match(os.fspath(path))


def as_path(path: str | os.PathLike) -> AnyPath:
    """`path` as a `pathlib.Path` when local, as an `etils.epath.Path` when it is a URI (gs://, s3://, ...).
    (pathlib would turn "gs://bucket/x" into the relative local path "gs:/bucket/x".)"""
    if is_local(path):
        return path if isinstance(path, Path) else Path(os.fspath(path))
    return epath.Path(path)


def absolute_path(path: str | os.PathLike) -> AnyPath:
    """`as_path(path)`, made absolute when local (so it stays valid if the caller changes directory, and
    Orbax, which wants absolute paths, takes it); a URI is absolute already."""
    path = as_path(path)
    return path.absolute() if isinstance(path, Path) else path


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory and everything under it; a missing one is no error."""
    path = as_path(path)
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.rmtree(missing_ok=True)


def files_under(path: str | os.PathLike) -> list[AnyPath]:
    """Every file under the directory `path`, sorted (none when it does not exist)."""
    path = as_path(path)
    if not path.exists():
        return []
    if isinstance(path, Path):
        return sorted(f for f in path.rglob("*") if f.is_file())
    # epath refuses "**" globs on object stores (one request per listing), so list level by level
    return sorted(f for p in path.iterdir() for f in (files_under(p) if p.is_dir() else [p]))


def upload_tree(local: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy every file under the local directory `local` to the same relative paths under `dest` (a local
    path or a URI), streamed: for files a library can only write locally (safetensors shards)."""
    local, dest = Path(local), as_path(dest)
    for f in files_under(local):
        target = dest / f.relative_to(local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)


def tree_bytes(path: str | os.PathLike) -> int:
    """The bytes of every file under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size if isinstance(f, Path) else f.stat().length for f in files_under(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> AnyPath:
    """Write `data` to `path` atomically: a temp file in the same directory, fsync, `os.replace`
    (on an object store: one upload, which is atomic there)."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(path, Path):
        path.write_bytes(data)
        return path
    # Same directory: os.replace is atomic only within one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> AnyPath:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> AnyPath:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def jsonl_text(rows: Iterable[Any]) -> str:
    """One JSON value per line, UTF-8 (not ASCII-escaped)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> AnyPath:
    return atomic_write_text(path, jsonl_text(rows))


def append_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows and fsync (a crash loses at most a torn last line, which readers may drop). On an
    object store the object is rewritten whole, so a reader never sees a torn line there."""
    path = as_path(path)
    if not isinstance(path, Path):
        atomic_write_text(path, (path.read_text(encoding="utf-8") if path.exists() else "") + jsonl_text(rows))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_text(rows))
        f.flush()
        os.fsync(f.fileno())


def read_utf8(path: str | os.PathLike, error: type[Exception] = ValueError) -> str:
    """A text file's contents; a file that is not UTF-8 raises `error` naming the file and line."""
    path = as_path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """A JSON file's value; a file that is not UTF-8 or not JSON raises `error` naming the file and line."""
    path = as_path(path)
    try:
        return json.loads(read_utf8(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


def numbered_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSON Lines file.

    A line that is not JSON, or a file that is not UTF-8, raises `error` naming the file and line."""
    path = as_path(path)
    for lineno, line in enumerate(read_utf8(path, error).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); one JSON value per line"
            ) from None


def read_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[Any]:
    """Every non-blank line of a JSON Lines file, parsed (errors as in `numbered_jsonl`)."""
    return [value for _, value in numbered_jsonl(path, error)]


def plain(obj: Any) -> Any:
    """A dataclass tree (or anything `json` half-knows) as plain JSON values: tuples become lists,
    numpy scalars and arrays become numbers and lists, other objects their `str`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    return str(obj)
