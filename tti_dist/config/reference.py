"""Generate the config reference (docs/config.md) from the schema itself.

Each field's documentation is the string literal under it in config/schema.py; Python
keeps no runtime record of such attribute docstrings, so they are read from the source
with `ast`. A unit test checks that docs/config.md equals this output, so the reference
cannot drift from the code:

    python -m tti_dist.config.reference > docs/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing

from tti_dist.config.schema import RunConfig


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} for a dataclass whose fields carry a string literal below them."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_text(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(tp))
    text = getattr(tp, "__name__", None) if origin is None else None
    return text or str(tp).replace("typing.", "").replace(f"{RunConfig.__module__}.", "").replace("|", "\\|")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "`[]`" if value == () else "(section)"
    return "required"


def render() -> str:
    """The whole reference as Markdown."""
    lines = [
        "# Config reference",
        "",
        "Generated from `tti_dist/config/schema.py` by `python -m tti_dist.config.reference`;",
        "do not edit by hand. A run config is a YAML file with these top-level sections; every",
        "key is optional (defaults below). Unknown keys are errors that name the closest valid key.",
        "Override any value on the command line: `tti train CONFIG --set section.key=value`.",
        "Units: steps are optimizer steps, batch sizes are sequences, lengths are tokens.",
        "",
    ]
    hints = typing.get_type_hints(RunConfig)
    top_docs = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        section = hints[f.name]
        lines += [f"## `{f.name}`", "", top_docs.get(f.name, ""), ""]
        optional = [c for c in typing.get_args(section) if dataclasses.is_dataclass(c)]
        if optional and typing.get_origin(section) in (typing.Union, types.UnionType):
            section = optional[0]  # `X | None`: off by default, X's keys once the section is given
            lines += ["Default `null` (off). A mapping turns it on; its keys default as below.", ""]
        if not dataclasses.is_dataclass(section):
            lines += [f"A list; default `[]`. {('' if f.name != 'regularizers' else 'Each entry is validated by its type.')}".rstrip(), ""]
            continue
        lines += [(inspect.getdoc(section) or "").split("\n")[0], ""]
        lines += _table(section)
        for sub, nested in _nested_sections(section):
            lines += [f"### `{f.name}.{sub}`", "", (inspect.getdoc(nested) or "").split("\n")[0], ""]
            lines += _table(nested)
    return "\n".join(lines).rstrip() + "\n"


def _table(section: type) -> list[str]:
    """The key/type/default/meaning table of a section's fields, and a blank line."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    docs = field_docs(section)
    sub_hints = typing.get_type_hints(section)
    for sub in dataclasses.fields(section):
        meaning = docs.get(sub.name, "").replace("|", "\\|")
        lines.append(f"| `{sub.name}` | {_type_text(sub_hints[sub.name])} | {_default_text(sub)} | {meaning} |")
    return lines + [""]


def _nested_sections(section: type) -> list[tuple[str, type]]:
    """(field name, dataclass) of the fields that are sections themselves (`X` or `X | None`)."""
    out = []
    for name, tp in typing.get_type_hints(section).items():
        candidates = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        nested = [c for c in candidates if dataclasses.is_dataclass(c)]
        if nested:
            out.append((name, nested[0]))
    return out


if __name__ == "__main__":
    print(render(), end="")
