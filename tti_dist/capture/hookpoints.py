"""Named hookpoints: where regularizers and metrics read a model's activations.

A `HookPoint` is an identity module placed on an activation (TransformerLens' idea). Its
name is its module path with the `hook_` prefix dropped from the last part, so the module
`blocks.2.mlp.hook_act` is the hookpoint `blocks.2.mlp.act`. Each hookpoint knows whether
its activation is split across tensor-parallel ranks (and along which dimension), so a
regularizer can reduce over the right group: what a rank sees is always its local shard.

`ActivationCapture` records the outputs of selected hookpoints during a forward pass,
keeping their autograd graph so losses on them train the model.

With activation checkpointing a block's forward runs twice: once in the forward pass and
again inside backward, to rebuild what was not kept. Observers (the capture here, a
regularizer's forward hook) must see only the first run: the second would overwrite what a
loss already read, advance per-forward counters, and run their collectives inside backward.
The model enters `recomputation()` around the second run; observers check `is_recomputing()`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tti_dist.errors import ConfigError


class HookPoint(nn.Module):
    """Identity on an activation; a place to observe it by name.

    Args:
        global_dim: size of the last dimension of the whole (unsharded) activation.
        tp_sharded: whether the last dimension is split across the tensor-parallel group
            (each rank holds a contiguous slice of global_dim / tp_size units).
    """

    def __init__(self, global_dim: int, tp_sharded: bool):
        super().__init__()
        self.global_dim = global_dim
        self.tp_sharded = tp_sharded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


_recompute_state = threading.local()
"""Per thread: autograd may recompute on its own worker thread (one per CUDA device)."""


@contextlib.contextmanager
def recomputation() -> Iterator[None]:
    """Mark the forward run inside this block as a recomputation (activation checkpointing)."""
    depth = getattr(_recompute_state, "depth", 0)
    _recompute_state.depth = depth + 1
    try:
        yield
    finally:
        _recompute_state.depth = depth


def is_recomputing() -> bool:
    """Whether the current forward is a recomputation in backward, which observers skip."""
    return getattr(_recompute_state, "depth", 0) > 0


@dataclass(frozen=True)
class HookPointInfo:
    """What a hookpoint holds on this rank."""

    name: str
    """Public name, e.g. blocks.0.mlp.act."""
    tp_sharded: bool
    """True when the last dimension is split across TP ranks."""
    global_dim: int
    """Last-dimension size of the whole activation."""
    module: HookPoint
    """The module (for registering forward hooks)."""


def _public_name(module_path: str) -> str:
    head, _, last = module_path.rpartition(".")
    last = last.removeprefix("hook_")
    return f"{head}.{last}" if head else last


def list_hookpoints(model: nn.Module) -> list[HookPointInfo]:
    """Every hookpoint of `model`, in module order."""
    return [
        HookPointInfo(_public_name(path), mod.tp_sharded, mod.global_dim, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, HookPoint)
    ]


def summarize_names(names: list[str]) -> str:
    """Compact listing: blocks.{0..3}.mlp.act instead of four names."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for name in names:
        m = re.match(r"^(.*?\.)(\d+)(\..*)$", name)
        key, idx = (f"{m.group(1)}{{}}{m.group(3)}", int(m.group(2))) if m else (name, -1)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(idx)
    out = []
    for key in order:
        idxs = sorted(groups[key])
        if idxs == [-1]:
            out.append(key)
        elif len(idxs) == 1:
            out.append(key.replace("{}", str(idxs[0])))
        elif idxs == list(range(idxs[0], idxs[-1] + 1)) and len(idxs) > 1:
            out.append(key.replace("{}", f"{{{idxs[0]}..{idxs[-1]}}}"))
        else:
            out.append(key.replace("{}", "{" + ",".join(map(str, idxs)) + "}"))
    return ", ".join(out)


def resolve_hookpoints(model: nn.Module, patterns: list[str] | tuple[str, ...], field: str) -> list[HookPointInfo]:
    """Hookpoints matching any of the glob `patterns` (`*` matches within and across dots).

    A pattern matching nothing is a user error naming `field` and listing what exists.
    """
    available = list_hookpoints(model)
    chosen: dict[str, HookPointInfo] = {}
    for i, pattern in enumerate(patterns):
        hits = [hp for hp in available if fnmatch.fnmatchcase(hp.name, pattern)]
        if not hits:
            raise ConfigError(
                f"{field}[{i}]: {pattern!r} matches no hookpoint; available: "
                f"{summarize_names([hp.name for hp in available])}"
            )
        for hp in hits:
            chosen.setdefault(hp.name, hp)
    return list(chosen.values())


class ActivationCapture:
    """Context manager recording the outputs of hookpoints during forward passes.

    `captured[name]` is the local shard of the activation from the latest forward, still
    attached to the autograd graph. Use one capture per micro-step and clear it after the
    backward so the graph is freed.
    """

    def __init__(self, hookpoints: list[HookPointInfo]):
        self.hookpoints = hookpoints
        self.captured: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "ActivationCapture":
        for hp in self.hookpoints:
            self._handles.append(hp.module.register_forward_hook(self._make_hook(hp.name)))
        return self

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if is_recomputing():
                return  # the forward's own tensor is the one losses read
            self.captured[name] = output

        return hook

    def clear(self) -> None:
        """Drop references to captured tensors (and so their graphs)."""
        self.captured.clear()

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
