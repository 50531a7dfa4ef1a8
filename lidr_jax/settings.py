"""Typed settings from YAML and `--set key=value` overrides, for any tree of frozen dataclasses.

Every run setting lives in a frozen `*Config` dataclass owned by the module that uses it
(`SamplingConfig` in sampling/sampler.py, `DPOConfig` in train/dpo.py, ...);
`lidr_jax.pipeline.config.RunConfig` nests them. This module turns a plain dict (parsed YAML) into that
tree, checking every key and every value's type *before* any work starts, so a typo fails in a second
with the key's dotted name instead of an hour into a run.

An enumeration is a `Literal[...]` annotation, checked one way (`check_choice`) whether the value comes
from YAML, `--set` or Python (a dataclass calls `check_choices(self)` in `__post_init__`). YAML is read
with YAML 1.2 booleans: only true/false are booleans, so `no`, `yes`, `on`, `off` stay strings (the
language code `no` is Norwegian) and become booleans only where a boolean is expected.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class SettingsError(ValueError):
    """A configuration key is unknown, its value has the wrong type or range, or a config file cannot be
    read; the message names the key or file and what to write instead."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (true/false only)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YAML11_BOOLS = {"yes": True, "on": True, "y": True, "no": False, "off": False, "n": False}


MAX_YAML_NODES = 100_000  # values a document may expand to through its aliases (a real config has hundreds)


class YAMLContentError(ValueError):
    """A YAML document that parses but cannot be a config: a key given twice, or aliases that expand
    beyond `MAX_YAML_NODES` values; the message names the line(s)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are all different: a key given twice is refused, naming both lines (PyYAML
    keeps the last one silently)."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key, line = loader.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
        if key in seen:
            raise YAMLContentError(f"line {line}: the key {key!r} is given twice (first on line {seen[key]}); keep one")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:map", lambda loader, node: _construct_mapping(loader, node))


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many values `node` stands for once every alias is expanded, computed once per node object (an
    alias bomb is measured in a few thousand steps); past `limit`, or a node that contains itself, gives
    `limit + 1`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        n, children_done = stack.pop()
        if id(n) in sizes:
            continue
        if isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = []
        if not children_done:
            if id(n) in open_nodes:  # reached again while its own children are being counted: recursive
                return limit + 1
            open_nodes.add(id(n))
            stack.append((n, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        open_nodes.discard(id(n))
        sizes[id(n)] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
    return sizes[id(node)]


def parse_yaml(text: str):
    """YAML text -> Python values (safe: no objects), with YAML 1.2 booleans (module docstring). A key
    given twice, or aliases that expand past `MAX_YAML_NODES` values (an alias bomb: a few hundred bytes
    that expand to billions), raise `YAMLContentError` before anything is built."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise YAMLContentError(
                f"line {node.start_mark.line + 1}: the document's aliases (*name) expand to more than "
                f"{MAX_YAML_NODES:,} values (or contain themselves); a config needs far fewer: write the values "
                "out instead of nesting aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def check_finite(obj, prefix: str = "") -> None:
    """Every float of a settings tree (dataclasses, nested) is a finite number: `.inf` or `nan` (from YAML,
    `--set`, or a string read as a float) would train to garbage without a word; SettingsError names the
    dotted key. Called on a loaded config, before any work."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            check_finite(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            check_finite(item, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            check_finite(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise SettingsError(f"{prefix}={obj!r}: must be a finite number")


def check_choice(value: Any, choices: tuple, key: str) -> None:
    """`value` is one of `choices` (a `Literal`'s arguments), else SettingsError naming `key`."""
    if value not in choices:
        raise SettingsError(f"{key} must be one of {list(choices)}, got {value!r}")


def check_choices(obj) -> None:
    """Every `Literal[...]` field of dataclass `obj` holds one of its choices, and every item of a
    `tuple[Literal[...], ...]` field one of the items' choices (call it in `__post_init__`); the error
    is `check_choice`'s, as when the loader reads the value."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        optional, tp = _is_optional(hints[f.name])
        value = getattr(obj, f.name)
        if optional and value is None:
            continue
        if typing.get_origin(tp) is typing.Literal:
            check_choice(value, typing.get_args(tp), f.name)
        elif typing.get_origin(tp) in (tuple, list) and isinstance(value, (tuple, list)):
            item = (typing.get_args(tp) or (Any,))[0]
            if typing.get_origin(item) is typing.Literal:
                for i, v in enumerate(value):
                    check_choice(v, typing.get_args(item), f"{f.name}[{i}]")


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, functools.reduce(operator.or_, args)
    return False, tp


def _coerce(value: Any, tp, key: str):
    """Check (and gently coerce: int -> float, list -> tuple) `value` against the annotation `tp`."""
    if tp is Any:
        return value
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise SettingsError(f"{key}: null is not allowed here (expected {_name(tp)})")
    tp = inner
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        check_choice(value, typing.get_args(tp), key)
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except SettingsError:
                continue
        raise SettingsError(f"{key}: {value!r} matches none of {_name(tp)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise SettingsError(f"{key}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string; 1.0e-3 as a float
            try:
                value = float(value)
            except ValueError:
                raise SettingsError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:  # yes/no/on/off where a boolean is expected
            return _YAML11_BOOLS[value.lower()]
        if not isinstance(value, bool):
            raise SettingsError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SettingsError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise SettingsError(f"{key}: expected {_name(tp)}, got {value!r}")
    return value


def _name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass `cls` from `data`; unknown keys and badly typed values raise SettingsError."""
    if not isinstance(data, dict):
        raise SettingsError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SettingsError(
            f"unknown setting '{prefix}{unknown[0]}'; known settings here: {', '.join(prefix + f for f in fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except SettingsError:
        raise
    except (TypeError, ValueError) as e:  # a dataclass's own __post_init__ validation
        raise SettingsError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 0.1, true, [en, fr] work)."""
    if "=" not in item:
        raise SettingsError(f"--set {item!r}: expected key=value, e.g. --set dpo.beta=0.1")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise SettingsError(f"--set {item!r}: empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except YAMLContentError as e:
        raise SettingsError(f"--set {key}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` items to a nested dict (creating intermediate mappings)."""
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise SettingsError(f"--set {item!r}: {part!r} is not a group of settings")
            node = nxt
        node[path[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping; a missing, unreadable, empty or malformed file raises
    SettingsError naming it (an empty file would otherwise run on every default)."""
    path = Path(path)
    if not path.exists():
        raise SettingsError(f"config file {path} does not exist; pass --config an existing YAML file")
    if path.is_dir():
        raise SettingsError(f"config file {path} is a folder; pass --config a YAML file (e.g. {path}/NAME.yaml)")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SettingsError(f"{path}: not UTF-8 text ({e.reason}); save the config file as UTF-8") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise SettingsError(f"{path}{line}: not valid YAML ({problem}); fix the file's syntax") from None
    except YAMLContentError as e:
        raise SettingsError(f"{path}:{str(e).removeprefix('line ')}") from None
    if data is None:
        raise SettingsError(f"{path} is empty; write the settings to change (or pass no --config for the defaults)")
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the top level must be a mapping of settings (key: value lines)")
    return data


def describe(obj, prefix: str = "", indent: int = 2) -> str:
    """Every setting of a dataclass tree (class or instance) with its default and comment, for `--help`.

    Given an instance, the values shown are that instance's (so a group nested with non-default
    values, like the run's paper decoding, shows what the run really uses)."""
    cls = obj if isinstance(obj, type) else type(obj)
    lines = []
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if not isinstance(obj, type):
            value = getattr(obj, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = "(required)"
        _, inner = _is_optional(hints[f.name])
        if dataclasses.is_dataclass(inner) and dataclasses.is_dataclass(value):
            summary = (inner.__doc__ or "").strip().splitlines()[0]
            lines.append(f"{' ' * indent}{prefix}{f.name}:  {summary}")
            lines.append(describe(value, prefix + f.name + ".", indent + 2))
            continue
        doc = docs.get(f.name, "")
        lines.append(f"{' ' * indent}{prefix}{f.name} = {value!r}{'   # ' + doc if doc else ''}")
    return "\n".join(lines)


def _field_docs(cls) -> dict[str, str]:
    """Trailing `# comment` of each field in the class source: the docs live next to the field."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs = {}
    for line in source.splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith(("#", "def ", "class ")):
            name = stripped.split(":", 1)[0].strip()
            if name.isidentifier():
                docs[name] = stripped.split("#", 1)[1].strip()
    return docs
