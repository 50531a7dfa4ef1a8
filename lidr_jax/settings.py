"""Typed settings from YAML and `--set key=value` overrides, for any tree of frozen dataclasses.

Every run setting lives in a frozen dataclass owned by the module that uses it (`SamplingConfig` in
sampler.py, `DPOConfig` in train.py, ...); `lidr_jax.pipeline.config.RunConfig` nests them. This module
turns a plain dict (parsed YAML) into that tree, checking every key and every value's type *before* any
work starts, so a typo fails in a second with the key's dotted name instead of an hour into a run.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class SettingsError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
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
        choices = typing.get_args(tp)
        if value not in choices:
            raise SettingsError(f"{key}: {value!r} is not one of {list(choices)}")
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


def to_dict(obj) -> dict[str, Any]:
    """A dataclass tree as plain YAML/JSON-friendly data (tuples become lists)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 0.1, true, [en, fr] work)."""
    if "=" not in item:
        raise SettingsError(f"--set {item!r}: expected key=value, e.g. --set dpo.beta=0.1")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise SettingsError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
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
    path = Path(path)
    if not path.exists():
        raise SettingsError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the top level must be a mapping of settings")
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
    import inspect

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
