"""Coefficient schedules for regularizers.

A regularizer's effective weight at optimizer step s (0-based, the step being computed) is
`coefficient * factor(s)`:

    s <  start_step or (stop_step is not None and s >= stop_step):  factor = 0
    constant:       factor = 1
    linear_warmup:  factor = min(1, (s - start_step + 1) / warmup_steps)
    linear_anneal:  factor = 1 + (final_ratio - 1) * p
    cosine_anneal:  factor = final_ratio + (1 - final_ratio) * (1 + cos(pi * p)) / 2
        with p = min(1, (s - start_step) / anneal_steps)

Warmups ramp a penalty in after the model has learned something (a strong sparsity penalty
from step 0 kills units before they carry information); anneals relax it, e.g. to hand over
to the task loss late in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tti_dist.errors import ConfigError


@dataclass(frozen=True)
class ScheduleConfig:
    """How a regularizer's coefficient changes over optimizer steps."""

    kind: Literal["constant", "linear_warmup", "linear_anneal", "cosine_anneal"] = "constant"
    """Shape of the schedule (formulas in the module docstring)."""
    start_step: int = 0
    """Optimizer step at which the regularizer switches on (factor 0 before)."""
    stop_step: int | None = None
    """Optimizer step at which it switches off again; null: never."""
    warmup_steps: int = 0
    """linear_warmup: steps from start_step to full strength."""
    anneal_steps: int = 0
    """linear_anneal / cosine_anneal: steps from start_step to final_ratio."""
    final_ratio: float = 0.0
    """linear_anneal / cosine_anneal: factor reached after anneal_steps."""

    def validate(self, where: str) -> None:
        """One-line ConfigError naming `where.<field>` on a bad value."""
        if self.start_step < 0:
            raise ConfigError(f"{where}.start_step: {self.start_step} must be >= 0")
        if self.stop_step is not None and self.stop_step <= self.start_step:
            raise ConfigError(
                f"{where}.stop_step: {self.stop_step} must be after start_step = {self.start_step}"
            )
        if self.kind == "linear_warmup" and self.warmup_steps < 1:
            raise ConfigError(f"{where}.warmup_steps: {self.warmup_steps} must be >= 1 for kind 'linear_warmup'")
        if self.kind in ("linear_anneal", "cosine_anneal"):
            if self.anneal_steps < 1:
                raise ConfigError(f"{where}.anneal_steps: {self.anneal_steps} must be >= 1 for kind {self.kind!r}")
            if not (math.isfinite(self.final_ratio) and self.final_ratio >= 0):
                raise ConfigError(f"{where}.final_ratio: {self.final_ratio!r} must be a finite number >= 0")

    def factor(self, step: int) -> float:
        """Multiplier of the coefficient at optimizer step `step`."""
        if step < self.start_step or (self.stop_step is not None and step >= self.stop_step):
            return 0.0
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear_warmup":
            return min(1.0, (step - self.start_step + 1) / self.warmup_steps)
        p = min(1.0, (step - self.start_step) / self.anneal_steps)
        if self.kind == "linear_anneal":
            return 1.0 + (self.final_ratio - 1.0) * p
        return self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
