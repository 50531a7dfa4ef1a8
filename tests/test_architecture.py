"""The layout of the package (docs/architecture.md): imports flow downward between layers, no module
imports another in a cycle, imports sit at the top of a module, and no code is written twice.

The checks parse the source with `ast` (nothing is imported), so a violation names the two modules
and the line without running any of the package."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lidr_jax

PACKAGE = Path(__file__).resolve().parents[1] / "lidr_jax"

# Layers from the bottom up. A module may import modules of its own package and of lower layers only;
# two packages on the same layer (sampling, train) never import each other.
LAYERS = [
    {"files"},
    {"settings"},  # every settings class declares its fields with settings.setting, the endpoint's too
    {"shapes", "endpoint", "progress"},
    {"parallel"},
    {"model"},
    {"formats"},
    {"sampling", "train"},
    {"methods"},
    {"eval"},
    {"pipeline"},
    {"__init__", "iterate", "dpo", "export", "evaluate", "pairs", "plan"},  # entry modules and the public surface
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def room(module: str) -> str:
    """`lidr_jax.model.llama` -> `model`; `lidr_jax.files` -> `files`; `lidr_jax` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(module: str, source: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(imported lidr_jax module, line, at module level) for every import of the package in `source`."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body} | {
        id(child) for node in tree.body if isinstance(node, (ast.If, ast.Try)) for child in ast.walk(node)
    }
    here = module.split(".") if is_package else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]  # a module, or a name inside `base`
        else:
            continue
        for name in names:
            if name == "lidr_jax" or name.startswith("lidr_jax."):
                out.append((name, node.lineno, id(node) in top))
    return out


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import that goes up or sideways between layers, every import of the package made inside a
    function, and every cycle between modules, as readable lines."""
    found = []
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, (source, is_package) in sources.items():
        for name, line, at_top in imports(module, source, is_package):
            target = name if name in sources else name.rsplit(".", 1)[0]
            a, b = room(module), room(target)
            if not at_top:
                found.append(f"{module}:{line} imports {target} inside a function (import it at the top)")
            if a != b and RANK[b] >= RANK[a]:
                found.append(f"{module}:{line} imports {target}: layer {a!r} may not import layer {b!r}")
            if target in sources and target != module:
                graph[module].add(target)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                found.append("import cycle: " + " -> ".join([*path[path.index(n) :], n]))
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return list(dict.fromkeys(found))  # `from a import b, c` is one import


def unexplained_lazy_imports(module: str, source: str) -> list[str]:
    """Imports of other libraries inside a function with no comment (on the line or the line above)
    saying why: the one reason allowed is an optional or heavy dependency."""
    tree = ast.parse(source)
    lines = source.splitlines()
    at_top = {
        id(child)
        for node in tree.body
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef))
        for child in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in at_top:
            said = "#" in lines[node.lineno - 1] or "#" in lines[node.lineno - 2]
            if not said:
                found.append(
                    f"{module}:{node.lineno}: `{lines[node.lineno - 1].strip()}` inside a function, no reason given"
                )
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    return {
        module_name(p, PACKAGE): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def test_every_module_has_a_layer():
    unknown = sorted({room(m) for m in package_sources()} - set(RANK))
    assert unknown == [], f"modules outside every layer (add them to docs/architecture.md and LAYERS): {unknown}"


def test_imports_flow_downward_without_cycles():
    assert violations(package_sources()) == []


def test_methods_and_evaluation_import_nothing_from_training():
    """Scoring answers is the model layer's (lidr_jax.model.scoring): ICR and the held-out check need no trainer."""
    found = [
        f"{module}:{line} imports {name}"
        for module, (source, is_package) in package_sources().items()
        if room(module) in ("methods", "eval")
        for name, line, _ in imports(module, source, is_package)
        if room(name) == "train"
    ]
    assert found == []


def test_lazy_imports_say_why():
    found = [line for m, (src, _) in package_sources().items() for line in unexplained_lazy_imports(m, src)]
    assert found == []


def test_checker_names_the_modules_of_a_violation():
    """The checker itself can fail: an upward import, a sibling import, a lazy import and a cycle."""
    sources = {
        "lidr_jax.model.llama": ("from lidr_jax.parallel import sharding\n", False),
        "lidr_jax.parallel.sharding": ("import numpy\nfrom lidr_jax.model.llama import forward\n", False),
        "lidr_jax.train.dpo": ("def f():\n    from lidr_jax.sampling import sampler\n", False),
        "lidr_jax.sampling.sampler": ("from . import rules\n", False),
        "lidr_jax.sampling.rules": ("from .sampler import generate\n", False),
    }
    assert violations(sources) == [
        "lidr_jax.parallel.sharding:2 imports lidr_jax.model.llama: layer 'parallel' may not import layer 'model'",
        "lidr_jax.train.dpo:2 imports lidr_jax.sampling.sampler inside a function (import it at the top)",
        "lidr_jax.train.dpo:2 imports lidr_jax.sampling.sampler: layer 'train' may not import layer 'sampling'",
        "import cycle: lidr_jax.model.llama -> lidr_jax.parallel.sharding -> lidr_jax.model.llama",
        "import cycle: lidr_jax.sampling.rules -> lidr_jax.sampling.sampler -> lidr_jax.sampling.rules",
    ]
    lazy = "def f():\n    import yaml\n\n\ndef g():\n    # optional: the plots extra\n    import matplotlib\n"
    assert unexplained_lazy_imports("lidr_jax.x", lazy) == [
        "lidr_jax.x:2: `import yaml` inside a function, no reason given"
    ]


def test_no_code_written_twice():
    """`duplicates` (the workplace's repeated-code finder) over the package reports no pair of identical runs."""
    tool = shutil.which("duplicates")
    if tool is None:
        pytest.skip("the `duplicates` command is not installed on this machine (CI has it)")
    out = subprocess.run([tool, "--repo", str(PACKAGE), "--most", "40"], capture_output=True, text=True, timeout=120)
    rows = [line for line in out.stdout.splitlines() if re.match(r"D\d+ ", line)]
    # Rows of the same shape alone are declarations written field by field (settings with their help and
    # ranges, argparse flags), not logic written twice; the same lines twice fail.
    assert [row for row in rows if not row.rstrip().endswith("shape")] == [], out.stdout
    assert out.stdout.startswith("no duplicates") or rows, out.stdout


def test_no_subpackage_shadows_a_public_name():
    """`from lidr_jax import generate` must give the function: importing a subpackage binds its name on
    the parent package, so a room named like a public export would replace the export."""
    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    rooms |= {p.stem for p in PACKAGE.glob("*.py")}
    assert rooms & set(lidr_jax.__all__) == set()


def test_public_names_are_what_the_readme_imports():
    code = "from lidr_jax import load_pretrained, forward, generate, SamplingConfig, export_hf\n"
    code += "import lidr_jax.sampling.engine\n"  # importing a subpackage afterwards changes nothing
    code += "from lidr_jax import generate as g2\n"
    code += "print(all(callable(f) for f in (load_pretrained, forward, generate, SamplingConfig, export_hf, g2)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_ruff_checks_every_product_file():
    """ruff skips folders it takes for build output (`dist/`, `build/`, ...): every module of the package
    must be in the files it checks, or `make test`'s lint passes over it without a word."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed beside this Python (the test extra installs it)")
    root = PACKAGE.parent
    listed = subprocess.run(
        [str(ruff), "check", "--show-files", "lidr_jax"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    checked = {Path(line.strip()).resolve() for line in listed.splitlines() if line.strip().endswith(".py")}
    modules = {p.resolve() for p in PACKAGE.rglob("*.py")}
    assert sorted(str(p.relative_to(root)) for p in modules - checked) == []
