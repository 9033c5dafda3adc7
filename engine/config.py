"""Typed configuration: YAML and `key.sub=value` overrides into frozen, validated dataclasses.

Each concern declares its own frozen dataclass (fields with one-line docstrings as comments, and a
`__post_init__` that validates with `check`). `from_dict` builds a tree of them from plain data and
reports every problem as one `ConfigError` whose message starts with the full key path.

Every `float` field must be finite: `.inf` or `.nan` (from YAML or an override) is refused here,
for constants and schedules alike, since no setting means anything at infinity and a NaN
compares false with every range check its `__post_init__` would make.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration problem a user can fix: `ConfigError: <key path>: <what is wrong>`."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)


def check(condition: bool, key: str, message: str) -> None:
    """Raise `ConfigError(key, message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(key, message)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if float in args and isinstance(value, float):  # the one error: not finite
            return _coerce(value, float, key)
        structs = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, Mapping) and len(structs) == 1:
            # Only one member takes a mapping: its error names the exact sub-key.
            return _coerce(value, structs[0], key)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(key, " or ".join(errors))
    if origin is Literal:
        check(value in args, key, f"must be one of {', '.join(map(repr, args))} (got {value!r})")
        return value
    if dataclasses.is_dataclass(hint):
        check(isinstance(value, Mapping), key, f"must be a mapping (got {value!r})")
        return from_dict(hint, value, prefix=key)
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), key, f"must be a list (got {value!r})")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        check(isinstance(value, Mapping), key, f"must be a mapping (got {value!r})")
        return dict(value)
    if hint is bool:
        check(isinstance(value, bool), key, f"must be true or false (got {value!r})")
        return value
    if hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), key,
              f"must be an integer (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `3e-4` (no dot) as a string
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
              f"must be a number (got {value!r})")
        check(math.isfinite(value), key, f"must be a finite number (got {value})")
        return float(value)
    if hint is str:
        check(isinstance(value, str), key, f"must be a string (got {value!r})")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys, wrong types and invalid values raise."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
            raise ConfigError(_join(prefix, str(key)), f"unknown key{hint}")
    kwargs = {name: _coerce(data[name], hints[name], _join(prefix, name))
              for name in fields if name in data}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and not err.key.startswith(prefix):
            raise ConfigError(_join(prefix, err.key), err.message) from None
        raise


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a dataclass tree; round-trips through `from_dict`."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=1` -> (["a", "b"], 1); values are parsed as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(item, "an override must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(key, f"cannot parse value {raw!r}: {_yaml_problem(err)}") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` applied (creating sections as needed)."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for path, value in parse_overrides(overrides):
        node = out
        for i, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(path[: i + 1]), "is not a section")
        node[path[-1]] = value
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's complaint as one line: `line L, column C: problem` (1-based), no caret art."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (safe loader only); a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("config", f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping at the top level")
    return data
