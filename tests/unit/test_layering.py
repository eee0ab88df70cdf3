"""The package's import graph goes one way, layer by layer, and has no cycles.

Every module's imports are parsed with `ast` (module level and function level alike: a
function-local import is a dependency too). A module may import from its own layer or the
layers below it, never above; no two modules may depend on each other through any chain
(a package `__init__` counts as a module of its own). Function-local imports between the
package's own modules are refused: they hide the dependency graph. The function-local
imports allowed are of heavy third-party libraries kept lazy on purpose (LAZY_THIRD_PARTY),
and, in tti_dist.commands only, of the modules that run ranks (megatron-core loads only
after the command's input was validated); each with a `# lazy: <why>` comment.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tti_dist"

LAYERS: dict[str, int] = {
    "cli": 6,
    "commands": 5,
    "train": 4, "eval": 4, "runtime": 4, "orchestrate": 4, "report": 4, "toy": 4,
    "regularizers": 3, "sae": 3,
    "models": 2, "capture": 2, "metrics": 2,
    "config": 1, "data": 1, "distributed": 1, "rundir": 1,
    "utils": 0, "errors": 0, "__init__": 0,
}
"""Layer of each top-level module or subpackage of tti_dist (docs/design.md, "Layers")."""

LAZY_THIRD_PARTY = ("deepspeed", "ray", "transformers", "matplotlib", "tensorboard", "torch.utils.tensorboard",
                    "sklearn", "scipy", "tqdm", "torch.distributed.elastic", "wandb")
"""Libraries that may be imported inside a function, to keep `import tti_dist...` light
where they are not needed (a Ray driver must not import DeepSpeed; DeepSpeed must be
imported after its accelerator is chosen; plotting and TensorBoard only where used)."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(target: str) -> str:
    """The tti_dist module a dotted import target names (a name imported from a package
    resolves to the package's __init__ unless it is a submodule)."""
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in the module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                if module.startswith("tti_dist"):
                    # `from tti_dist.pkg import submodule` depends on the submodule.
                    for alias in child.names:
                        sub = f"{module}.{alias.name}"
                        found.append((sub if sub in MODULES else module, child.lineno, in_function))
                else:
                    found.append((module, child.lineno, in_function))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # typing-only imports are not runtime dependencies
            visit(child, local)

    visit(tree, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        raise AssertionError(f"{module}: tti_dist.{key} has no layer in LAYERS (add it, and to docs/design.md)")
    return LAYERS[key]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        graph[name] = {_resolve(t) for t, _, _ in _imports(name, path) if t.startswith("tti_dist")} - {name}
    return graph


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for name, path in MODULES.items():
        for target, line, _ in _imports(name, path):
            if target.startswith("tti_dist"):
                target = _resolve(target)
                if _layer(target) > _layer(name):
                    upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} (layer {_layer(name)}) "
                                  f"imports {target} (layer {_layer(target)})")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_function_local_imports_only_keep_heavy_libraries_lazy():
    hidden = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, line, in_function in _imports(name, path):
            if not in_function:
                continue
            own_allowed = target.startswith("tti_dist") and name.startswith("tti_dist.commands.")
            if not own_allowed and not target.startswith(LAZY_THIRD_PARTY):
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line}: import of {target} inside a function")
                continue
            if not _says_lazy(lines, line):
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line}: lazy import of {target} without a "
                              "'# lazy: <why>' comment")
    assert not hidden, "function-local imports:\n" + "\n".join(hidden)


def _says_lazy(lines: list[str], line: int) -> bool:
    """A `# lazy: <why>` comment on the import's line or above it, within the contiguous
    block of imports, blank lines and comments the import belongs to."""
    i = line - 1
    while i >= 0:
        text = lines[i].strip()
        if "# lazy" in text:
            return True
        if i < line - 1 and text and not text.startswith(("#", "import ", "from ")):
            return False
        i -= 1
    return False


def test_no_module_over_500_lines():
    long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, "modules over 500 lines:\n" + "\n".join(long)


@pytest.mark.parametrize("module,target", [("tti_dist.models.gpt", "tti_dist.train.engine")])
def test_the_checker_sees_a_violation(module, target, tmp_path):
    # The rule itself must be able to fail: an upward import in a synthetic module is found.
    fake = tmp_path / "gpt.py"
    fake.write_text(f"def f():\n    from {target} import build_engine\n")
    found = _imports(module, fake)
    assert found == [(target, 2, True)]
    assert _layer(target) > _layer(module)
