"""Typed settings from YAML and `--set key=value` overrides, for any tree of frozen dataclasses.

Every run setting lives in a frozen `*Config` dataclass owned by the module that uses it
(`SamplingConfig` in sampling/sampler.py, `DPOConfig` in train/dpo.py, ...);
`lidr_jax.pipeline.config.RunConfig` nests them. This module turns a plain dict (parsed YAML) into that
tree, checking every key and every value's type *before* any work starts, so a typo fails in a second
with the key's dotted name instead of an hour into a run.

Each field is declared once with `setting(default, doc, ge=..., ...)`: its help line (`--help`,
docs/configuration.md) and its range; an enumeration is a `Literal[...]` annotation. `check_settings`,
called first in every settings class's `__post_init__`, checks both whether the value comes from YAML,
`--set` or Python, and names the field; the loader puts the group's dotted prefix in front. YAML is read
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


# ------------------------------------------------------------------------------------------- fields


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    also: tuple = (),
    derived: dict[str, str] | None = None,
) -> Any:
    """A settings field with its help text and its bounds declared once, beside its default.

    `doc` is the line `--help` and docs/configuration.md print; `ge`/`gt`/`le`/`lt` bound a number
    (`also` lists values allowed outside the bounds, e.g. 0 for "off"), checked by `check_settings`
    whenever the class is built. On a field holding a group of settings, `derived` names the group's
    fields that the run computes itself ({name: where the value comes from}): the loader refuses them,
    and they are not listed as settings."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"doc": doc, "bounds": bounds, "also": tuple(also), "derived": dict(derived or {})}
    return dataclasses.field(default=default, metadata=metadata)


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


class FieldError(SettingsError):
    """One field's value is out of its declared range or choices (`check_settings`); `field` is its name,
    so that the loader can put the group's dotted prefix in front."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def bounds_text(f: dataclasses.Field) -> str:
    """A field's declared range in words ("must be >= 1 (or 0)"), "" if it has none."""
    bounds, also = f.metadata.get("bounds", {}), f.metadata.get("also", ())
    if not bounds:
        return ""
    text = " and ".join(f"{_BOUNDS[k][1]} {v}" for k, v in bounds.items())
    return f"must be {text}" + (f" (or {', '.join(map(repr, also))})" if also else "")


def check_settings(obj) -> None:
    """Every field of settings dataclass `obj` within its declared bounds (`setting`) and every
    `Literal[...]` field (or item of a `tuple[Literal[...], ...]`) one of its choices; call it first in
    `__post_init__`. Raises `FieldError` naming the field; rules that tie fields together stay in the
    class's `__post_init__` as ValueErrors."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        optional, tp = _is_optional(hints[f.name])
        value = getattr(obj, f.name)
        if optional and value is None:
            continue
        if typing.get_origin(tp) is typing.Literal:
            _check_choice(value, typing.get_args(tp), f.name)
        elif typing.get_origin(tp) in (tuple, list) and isinstance(value, (tuple, list)):
            item = (typing.get_args(tp) or (Any,))[0]
            if typing.get_origin(item) is typing.Literal:
                for i, v in enumerate(value):
                    _check_choice(v, typing.get_args(item), f"{f.name}[{i}]")
        bounds = f.metadata.get("bounds", {})
        if bounds and value not in f.metadata.get("also", ()):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (ok and all(_BOUNDS[k][0](value, v) for k, v in bounds.items())):
                raise FieldError(f.name, f"{bounds_text(f)}, got {value!r}")
        for name, source in derived_fields(f).items():  # built in Python: a derived field keeps its default
            group_field = next(g for g in dataclasses.fields(value) if g.name == name)
            if getattr(value, name) != _default(type(value), group_field):
                raise FieldError(f"{f.name}.{name}", f"is not a setting: {source}")


def _check_choice(value: Any, choices: tuple, field: str) -> None:
    if value not in choices:
        raise FieldError(field, f"must be one of {list(choices)}, got {value!r}")


def field_doc(cls, f: dataclasses.Field) -> str:
    """A field's help: its `setting(doc=...)`, else the comment beside or above it in the class source."""
    return f.metadata.get("doc") or _field_docs(cls).get(f.name, "")


def derived_fields(f: dataclasses.Field) -> dict[str, str]:
    """{name: where its value comes from} of the group held by field `f` (`setting(derived=...)`)."""
    return f.metadata.get("derived", {})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting of a tree: dotted key, its value in the tree given, its type, help and range."""

    key: str
    value: Any
    type: Any
    doc: str
    bounds: str


def leaves(obj, prefix: str = "", hidden: dict[str, str] | None = None) -> list[Leaf]:
    """Every leaf setting of a dataclass tree (class or instance), in declaration order, without the
    fields a parent declares `derived`: what a user can set."""
    out = []
    for cls, f, value, tp, group in _settable(obj, hidden):
        if group is not None:
            out += leaves(value, prefix + f.name + ".", derived_fields(f))
        else:
            out.append(Leaf(prefix + f.name, value, tp, field_doc(cls, f), bounds_text(f)))
    return out


def _settable(obj, hidden: dict[str, str] | None = None):
    """(class, field, value, annotation, group class or None) of each field of a settings class or
    instance a user can set (not `hidden`), with the instance's values or the class's defaults."""
    cls = obj if isinstance(obj, type) else type(obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init and f.name not in (hidden or {}):
            value = _default(obj, f)
            _, inner = _is_optional(hints[f.name])
            group = inner if dataclasses.is_dataclass(inner) and dataclasses.is_dataclass(value) else None
            yield cls, f, value, hints[f.name], group


def _default(obj, f: dataclasses.Field):
    if not isinstance(obj, type):
        return getattr(obj, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def type_name(tp) -> str:
    """An annotation as a reader writes it: `int | None`, `tuple[str, ...]`, `Literal['a', 'b']`."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, functools.reduce(operator.or_, args)
    return False, tp


def _coerce(value: Any, tp, key: str, base: Any = None, hidden: dict[str, str] | None = None):
    """Check (and gently coerce: int -> float, list -> tuple) `value` against the annotation `tp`; a
    mapping for a group of settings is read over `base` (the group's default in its parent) without the
    `hidden` (derived) fields."""
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
        return from_dict(tp, value, prefix=key + ".", base=base if isinstance(base, tp) else None, hidden=hidden)
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


def from_dict(cls, data: dict[str, Any], prefix: str = "", base: Any = None, hidden: dict[str, str] | None = None):
    """Build dataclass `cls` from `data`; unknown keys and badly typed values raise SettingsError.

    The keys `data` leaves out keep their value in `base` (default: the class's defaults), and so do
    those of a nested group: a group given in part keeps the rest of the default `--help` shows for it.
    The keys in `hidden` (a parent's `setting(derived=...)`) are refused with where their value comes from.
    """
    if not isinstance(data, dict):
        raise SettingsError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in (hidden or {})}
    for name in sorted(set(data) & set(hidden or {})):
        raise SettingsError(f"'{prefix}{name}' is not a setting: {hidden[name]}")
    unknown = sorted(set(data) - set(fields))
    moved = [k for k in unknown if k in getattr(cls, "MOVED_SETTINGS", {})]
    if moved:
        raise SettingsError(f"'{prefix}{moved[0]}' is now '{prefix}{cls.MOVED_SETTINGS[moved[0]]}'")
    if unknown:
        raise SettingsError(
            f"unknown setting '{prefix}{unknown[0]}'; known settings here: {', '.join(prefix + f for f in fields)}"
        )
    kwargs = {
        k: _coerce(
            v,
            hints[k],
            prefix + k,
            base=_default(cls if base is None else base, fields[k]),
            hidden=derived_fields(fields[k]),
        )
        for k, v in data.items()
    }
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except FieldError as e:
        raise SettingsError(f"{prefix}{e.field} {e.problem}") from None
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


def describe(obj, prefix: str = "", indent: int = 2, hidden: dict[str, str] | None = None) -> str:
    """Every setting of a dataclass tree (class or instance) with its default and comment, for `--help`.

    Given an instance, the values shown are that instance's (so a group nested with non-default
    values, like the run's paper decoding, shows what the run really uses)."""
    lines = []
    for cls, f, value, _, group in _settable(obj, hidden):
        if group is not None:
            summary = f.metadata.get("doc") or (group.__doc__ or "").strip().splitlines()[0]
            lines.append(f"{' ' * indent}{prefix}{f.name}:  {summary}")
            lines.append(describe(value, prefix + f.name + ".", indent + 2, derived_fields(f)))
            continue
        doc = "; ".join(filter(None, [field_doc(cls, f), bounds_text(f)]))
        lines.append(f"{' ' * indent}{prefix}{f.name} = {value!r}{'   # ' + doc if doc else ''}")
    return "\n".join(lines)


@functools.cache
def _field_docs(cls) -> dict[str, str]:
    """The `# comment` beside each field in the class source, else the comment lines right above it
    (for classes whose fields do not declare `setting(doc=...)`)."""
    docs, above = _docstring_fields(cls), []
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return docs
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        name = stripped.split(":", 1)[0].strip() if ":" in stripped else ""
        if name.isidentifier() and not stripped.startswith(("def ", "class ")):
            beside = stripped.split("  #", 1)[1].strip() if "  #" in stripped else ""
            if beside or above:
                docs.setdefault(name, beside or " ".join(above))
        above = []
    return docs


def _docstring_fields(cls) -> dict[str, str]:
    """Fields described in the class docstring as `name: text` (or `a / b: text`), with the text's
    indented continuation lines."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        head, sep, text = line.partition(":")
        keys = [k.strip() for k in head.split("/")]
        if sep and not line.startswith(" ") and keys and all(k in names for k in keys):
            current = keys
            for k in keys:
                docs[k] = text.strip()
        elif current and line.startswith(" "):
            for k in current:
                docs[k] += " " + line.strip()
        else:
            current = []
    return docs
