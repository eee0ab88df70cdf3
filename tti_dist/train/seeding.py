"""Seeding: identical weights on every rank, distinct runtime randomness per DP rank.

`seed_weights` runs on every rank before the model is built, with the same seed, so all
ranks (and every TP degree) construct the same full weights. `seed_runtime` runs after:
ranks of one tensor-parallel group share a seed (dropout masks on replicated activations
must agree across TP ranks, or the replicas would diverge); data-parallel replicas differ.
"""

from __future__ import annotations

import random

import numpy as np
import torch

# A prime stride keeps per-rank seeds apart from the base seeds users choose (1, 2, 3...).
_DP_SEED_STRIDE = 1_000_003


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_weights(seed: int) -> None:
    """Seed every RNG identically on all ranks (before building the model)."""
    _seed_all(seed)


def seed_runtime(seed: int, dp_rank: int) -> None:
    """Seed runtime randomness (dropout) per data-parallel rank, shared across TP ranks."""
    _seed_all(seed + _DP_SEED_STRIDE * (dp_rank + 1))
