"""The run config's `imports`: the user's own modules (plugins) that register regularizers.

A custom regularizer lives in the user's module: a settings class registered with
`tti_dist.config.regularizers.register_config` and an implementation registered with
`tti_dist.regularizers.base.register` under the same type name. The config names the module

    imports: [my_pkg.my_regularizers, plugins/extra_regs.py]
    regularizers:
      - {type: my_type, name: mine, coefficient: 1e-3, hookpoints: ["blocks.*.mlp.act"]}

and every process that parses or runs the config imports it before the `regularizers`
entries are parsed. An entry is either

- a dotted module name, imported with `importlib.import_module`: it must be importable in
  every process (installed, or on PYTHONPATH; for Ray, on the workers' path too), or
- a path to a `.py` file (relative to the config file's directory), imported on its own
  as the module named by its file stem; the resolved config records the absolute path.

How each process gets the import: the CLI process imports while loading the config
(config.load.config_from_dict). Spawned ranks and Ray workers receive the config pickled;
`PluginImports` (the type of `RunConfig.imports`) unpickles by importing its entries, and
`RunConfig` pickles its imports before its other fields, so the plugin modules are loaded
before pickle looks up their classes in the regularizer entries.

Importing a module twice in one process is a no-op (module names are cached in
sys.modules; a file is reused when the module of its stem was loaded from that file), so
the registrations run once. Every failure is a one-line ConfigError naming `imports[i]`,
the module and the reason (exit 2 before any process starts).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import site
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from tti_dist.errors import ConfigError

_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_file_entry(entry: str) -> bool:
    """Whether an `imports` entry names a .py file rather than a module."""
    return entry.endswith(".py")


class PluginImports(tuple):
    """The normalized `imports` entries (module names, absolute .py paths), in order.

    A tuple whose unpickling imports the entries: a process that receives a pickled
    RunConfig (a spawned rank, a Ray worker) loads the plugin modules before it reads the
    regularizer entries whose settings classes those modules define."""

    def __reduce__(self):
        return load_plugin_imports, (tuple(self),)


def load_plugin_imports(entries: tuple[str, ...]) -> PluginImports:
    """Import the (normalized) entries and return them as PluginImports (unpickling's hook)."""
    imports = PluginImports(entries)
    import_plugins(imports)
    return imports


def normalize_imports(value: Any, base_dir: str | Path | None = None) -> PluginImports:
    """The raw `imports` value as PluginImports: a list (or one string) of module names and
    .py paths, each path made absolute (relative paths from `base_dir`, the config file's
    directory; the working directory when None); ConfigError naming `imports[i]`."""
    if value is None:
        return PluginImports()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"imports: expected a list of module names or .py files, got {value!r}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    entries: list[str] = []
    for i, entry in enumerate(value):
        where = f"imports[{i}]"
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{where}: {entry!r} must be a module name (my_pkg.regs) or a path to a .py file")
        entry = entry.strip()
        if is_file_entry(entry):
            path = Path(entry).expanduser()
            path = (path if path.is_absolute() else base / path).resolve()
            if not path.stem.isidentifier():
                raise ConfigError(f"{where}: '{entry}': the file name must be a Python identifier "
                                  f"(it becomes the module name), got {path.stem!r}")
            entry = str(path)
        elif not _MODULE_NAME.match(entry):
            raise ConfigError(f"{where}: {entry!r} is not a module name (dotted identifiers, e.g. my_pkg.regs) "
                              "or a path to a .py file")
        if entry not in entries:
            entries.append(entry)
    return PluginImports(entries)


def import_plugins(entries: tuple[str, ...]) -> list[ModuleType]:
    """Import each normalized entry (see normalize_imports), in order; the modules."""
    return [_import_one(f"imports[{i}]", entry) for i, entry in enumerate(entries)]


def _import_one(where: str, entry: str) -> ModuleType:
    if is_file_entry(entry):
        return _import_file(where, Path(entry))
    if entry in sys.modules:
        return sys.modules[entry]
    try:
        return importlib.import_module(entry)
    except Exception as exc:  # ImportError, or whatever the module raised while executing
        raise ConfigError(f"{where}: cannot import {entry!r}: {_reason(exc)}") from None


def _import_file(where: str, path: Path) -> ModuleType:
    """The module of a .py file, named by its stem; the loaded one if it came from this file."""
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        if origin is not None and Path(origin).resolve() == path:
            return loaded
        raise ConfigError(f"{where}: '{path}' would be imported as module {name!r}, but a module {name!r} is "
                          f"loaded already (from {origin or 'a built-in'}); rename the file")
    if not path.is_file():
        raise ConfigError(f"{where}: '{path}' does not exist or is not a file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # In sys.modules before it runs, as an import does: pickle finds its classes by this name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if not isinstance(exc, Exception):
            raise
        raise ConfigError(f"{where}: cannot import '{path}' (as module {name!r}): {_reason(exc)}") from None
    return module


def plugin_search_paths(entries: tuple[str, ...]) -> list[str]:
    """The directories on this process's sys.path that the imported module entries were found
    in (for the PYTHONPATH of processes that do not share sys.path, e.g. Ray workers), except
    site-packages directories, which every interpreter of the environment has already.

    A module found through the working directory (`python -m` puts it on sys.path) is found
    by the workers only if its directory is passed on."""
    skip = set(site.getsitepackages()) | {site.getusersitepackages()}
    paths: list[str] = []
    for entry in entries:
        if is_file_entry(entry):
            continue  # imported by path wherever the config is unpickled
        top = sys.modules.get(entry.partition(".")[0])
        if top is None:
            continue
        if getattr(top, "__path__", None):  # a package: the directory that holds it
            found = [str(Path(p).resolve().parent) for p in top.__path__]
        elif getattr(top, "__file__", None):
            found = [str(Path(top.__file__).resolve().parent)]
        else:
            found = []  # built-in
        paths += [p for p in found if p not in skip and p not in paths]
    return paths


def _reason(exc: BaseException) -> str:
    """'ExcType: first line of its message' (the cause of a failed import, on one line)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
