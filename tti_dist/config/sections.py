"""Strict construction of config dataclasses from plain mappings.

Every config section (and every regularizer's settings) is a frozen dataclass whose field
annotations type the YAML values. `section_from_dict` builds one from a mapping: an unknown
key is a one-line ConfigError naming the closest valid key, and a value of the wrong type
one naming the field, the value and the expected type. Values are converted only where
that is lossless (an integral float to int, '1e-3' to a number).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from tti_dist.errors import ConfigError


def section_from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build one config section (e.g. ModelConfig) strictly; `prefix` names it in errors."""
    return _build(cls, raw, prefix)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key; {hint}valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            # `X | None` given a value: X's own error names the field and what X allows
            # (for a section: the inner key at fault, not the whole mapping).
            return _coerce(value, others[0], where)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{where}: {value!r} is not allowed; expected {allowed}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads '1e-3' (no dot) as a string; accept it as a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported annotation {tp!r} at {where}")


_TYPE_NAMES = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
"""How an annotation reads in an error message (YAML's words, not Python's type names)."""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))
