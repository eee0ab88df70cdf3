"""YAML -> typed `RunConfig`, with `--set a.b=value` overrides.

Loading is strict: an unknown key is an error that names the closest valid key, and a
value of the wrong type is an error naming the field, the value and the expected type.
Overrides are parsed as YAML scalars (`--set train.steps=20`, `--set optim.lr=1e-3`,
`--set model.tie_embeddings=false`) and then checked like file values, so they are typed
by the schema, not by guesswork.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tti_dist.config.schema import RunConfig
from tti_dist.errors import ConfigError


def read_yaml_mapping(path: str | Path | None, what: str = "a mapping at top level",
                      field: str = "config") -> dict[str, Any]:
    """The mapping in a YAML file ({} for None or an empty file); ConfigError (one line,
    naming `field`: the option or key that gave the path) when the file is missing, not
    YAML, or not a mapping."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: '{path}' does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{field}: '{path}' is not UTF-8 text (byte {exc.start}); a config is a YAML text file") \
            from None
    try:
        duplicate = _first_duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader), "")
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{field}: '{path}' is not valid YAML ({first})") from None
    if duplicate is not None:
        # YAML loaders keep the last value silently; the first would be a setting ignored.
        key, line = duplicate
        raise ConfigError(f"{key}: set twice in '{path}' (again on line {line}); keep one")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{field}: '{path}' must hold {what}, got {type(loaded).__name__}")
    return loaded


def _first_duplicate_key(node: yaml.Node | None, where: str) -> tuple[str, int] | None:
    """(dotted path, 1-based line) of the first key repeated within one mapping, else None."""
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            path = f"{where}.{key}" if where else str(key)
            tagged = (key_node.tag, key)  # 1 and '1' are different keys
            if key is not None and tagged in seen:
                return path, key_node.start_mark.line + 1
            seen.add(tagged)
            found = _first_duplicate_key(value_node, path)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _first_duplicate_key(item, f"{where}[{i}]")
            if found:
                return found
    return None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    raw = read_yaml_mapping(path)
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override to a raw config mapping, in place.

    List entries are addressed by index (`regularizers.0.coefficient=1e-3`).
    """
    if "=" not in override:
        raise ConfigError(f"--set: '{override}' must look like section.key=value")
    key, _, text = override.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set: '{override}' must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, here)]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        # Checked after list steps too: a list entry may be a value (a glob string).
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: '{here}' is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    indices = f"indices 0..{len(node) - 1}" if node else "none"
    if not part.isdigit():
        raise ConfigError(f"--set {where}: '{part}' is not a list index; the list has {len(node)} entries ({indices})")
    if int(part) >= len(node):
        raise ConfigError(f"--set {where}: index '{part}' out of range; the list has {len(node)} entries ({indices})")
    return int(part)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a `RunConfig` from a plain mapping, checking keys and types strictly."""
    return _build(RunConfig, raw, "")


def section_from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build one config section (e.g. ModelConfig) strictly; `prefix` names it in errors."""
    return _build(cls, raw, prefix)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-serialisable mapping of a config (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the file `tti train` leaves in RUN/config.yaml)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    Path(path).write_text(text)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


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
