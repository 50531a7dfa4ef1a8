"""Every file a docstring or comment in lidr_jax/ points the reader to exists in the repository.

A pointer is a path with a folder part (`docs/method.md`, `methods/icr.py`, `configs/demo.yaml`) or a
document named in capitals (`README.md`, `BENCHMARKS.md`); it resolves from the repository root, from
`lidr_jax/`, or from the folder of the file that names it. A folder written in capitals (`RUN_DIR/`) is
a placeholder for the user's own folder, and a bare lower-case name (`configs.yaml`, a library's
`langid.py`) is a name, not a pointer. Error-message strings are not read: only docstrings and comments.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "lidr_jax"
PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]*\w\.(?:md|py|yaml))\b")


def _texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a module."""
    source = path.read_text(encoding="utf-8")
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                out.append((node.body[0].lineno, doc))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    return out


def pointers(text: str) -> list[str]:
    """The file pointers in a piece of prose (module docstring)."""
    found = []
    for name in PATH.findall(text):
        folder, _, base = name.rpartition("/")
        if any(part.isupper() for part in folder.split("/") if part):
            continue  # RUN_DIR/report.md: the user's folder
        if not folder and not re.fullmatch(r"[A-Z][A-Z_]*\.md", base):
            continue  # a bare lower-case name
        found.append(name)
    return found


def _exists(name: str, where: Path) -> bool:
    return any((base / name).exists() for base in (REPO_ROOT, PACKAGE, where))


def test_the_rule_finds_pointers_and_skips_names():
    text = "see DESIGN.md, docs/method.md 1.3 and methods/icr.py; RUN_DIR/report.md; configs.yaml; langid.py"
    assert pointers(text) == ["DESIGN.md", "docs/method.md", "methods/icr.py"]
    assert not _exists("DESIGN.md", PACKAGE) and _exists("methods/icr.py", PACKAGE)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_docstrings_and_comments_name_files_that_exist(path):
    missing = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {name}"
        for line, text in _texts(path)
        for name in pointers(text)
        if not _exists(name, path.parent)
    ]
    assert missing == []
