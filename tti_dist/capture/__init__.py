"""Named hookpoints and activation capture (local tensor-parallel shards)."""

from tti_dist.capture.hookpoints import (
    ActivationCapture,
    HookPoint,
    HookPointInfo,
    list_hookpoints,
    resolve_hookpoints,
    summarize_names,
)

__all__ = ["ActivationCapture", "HookPoint", "HookPointInfo", "list_hookpoints", "resolve_hookpoints", "summarize_names"]
