"""YAML -> typed `RunConfig`, with `--set a.b=value` overrides.

Loading is strict (config.sections): an unknown key is an error that names the closest
valid key, and a value of the wrong type is an error naming the field, the value and the
expected type. The `regularizers` list is parsed into typed entries at the same time
(config.regularizers), after the plugin modules named by `imports` were imported
(config.plugins).
Overrides are parsed as YAML scalars (`--set train.steps=20`, `--set optim.lr=1e-3`,
`--set model.tie_embeddings=false`) and then checked like file values, so they are typed
by the schema, not by guesswork.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from tti_dist.config.plugins import import_plugins, normalize_imports
from tti_dist.config.regularizers import RegularizerConfig, parse_regularizers, regularizer_to_dict
from tti_dist.config.schema import RunConfig
from tti_dist.config.sections import section_from_dict
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
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides.

    Relative .py paths in `imports` are relative to the config file's directory."""
    raw = read_yaml_mapping(path)
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw, base_dir=Path(path).parent if path is not None else None)


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


def config_from_dict(raw: dict[str, Any], base_dir: str | Path | None = None) -> RunConfig:
    """Build a `RunConfig` from a plain mapping, checking keys and types strictly.

    The modules named by `imports` are imported first (config.plugins; relative .py paths
    from `base_dir`, the config file's directory, else the working directory), so that the
    regularizer types they register are known; then the sections are built, and the
    `regularizers` list is parsed into typed entries last (config.regularizers.parse_regularizers)."""
    if not isinstance(raw, dict) or not ({"imports", "regularizers"} & raw.keys()):
        return section_from_dict(RunConfig, raw, "")
    imports = normalize_imports(raw.get("imports"), base_dir)
    import_plugins(imports)
    sections = {k: v for k, v in raw.items() if k not in ("imports", "regularizers")}
    cfg = section_from_dict(RunConfig, sections, "")
    regularizers = parse_regularizers(raw["regularizers"]) if "regularizers" in raw else ()
    return dataclasses.replace(cfg, imports=imports, regularizers=regularizers)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-serialisable mapping of a config (tuples become lists, regularizer
    entries the mappings a config file holds) that `config_from_dict` reads back."""
    return _plain(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the file `tti train` leaves in RUN/config.yaml)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    Path(path).write_text(text)


def _plain(obj: Any) -> Any:
    if isinstance(obj, RegularizerConfig):
        return regularizer_to_dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
