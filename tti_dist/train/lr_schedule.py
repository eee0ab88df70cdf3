"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

For optimizer step s (0-based; the LR used by the s-th update), with W warmup steps,
S total steps and floor ratio r:
    s < W:  lr(s) = lr * (s + 1) / W
    s >= W: lr(s) = lr * (r + (1 - r) * (1 + cos(pi * p)) / 2),  p = (s - W) / (S - W - 1)
            (p = 1 when S - W - 1 = 0: the only post-warmup step is the last one)
so the first update already moves (no wasted step at lr = 0), the peak is reached at the
end of warmup, and the last update (s = S - 1) uses exactly lr * r.
"""

from __future__ import annotations

import math

import torch


def lr_ratio(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for 0-based optimizer step `step`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps - 1
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `lr_ratio`; DeepSpeed steps it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_ratio(s, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio),
    )
