"""Seeding: the global RNGs of a rank, and the seeds of private torch.Generators.

`seed_weights` runs on every rank before the model is built, with the same seed, so all
ranks (and every TP degree) construct the same full weights. `seed_runtime` runs after:
ranks of one tensor-parallel group share a seed (dropout masks on replicated activations
must agree across TP ranks, or the replicas would diverge); data-parallel replicas differ.

Private generators (draws that must not touch the global RNG) are seeded from integers
mixed by one of three functions. They give different numbers for the same inputs, so each
caller keeps its own (changing one changes the draws its seeds produce):
- `splitmix_seed(seed, key)`: SplitMix64 applied twice (SAE initialisation, hard masks).
- `fold_seed(*parts)`: a multiply-xorshift fold of any number of parts (orthogonality's samples).
- `linear_seed(seed, rank, call)`: a linear combination (the regularizers' token samples).
"""

from __future__ import annotations

import random

import numpy as np
import torch

# A prime stride keeps per-rank seeds apart from the base seeds users choose (1, 2, 3...).
_DP_SEED_STRIDE = 1_000_003

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


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


def splitmix64(z: int) -> int:
    """SplitMix64's output function of z + the golden gamma (Steele, Lea & Flood 2014), 64 bits."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def splitmix_seed(seed: int, key: int) -> int:
    """A generator seed < 2**63 from (seed, key): splitmix64(splitmix64(seed) XOR key) >> 1."""
    return splitmix64(splitmix64(seed) ^ key) >> 1


def fold_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms.

    h = 0x9E3779B97F4A7C15; for each part p (taken mod 2**64):
    h = ((h XOR p) * 0xBF58476D1CE4E5B9) mod 2**64, h ^= h >> 31; the result is h mod 2**63.
    (SplitMix64's first multiply-xorshift round as a fold; not `splitmix_seed`.)
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h ^= h >> 31
    return h & _MASK63


def linear_seed(seed: int, rank: int, call: int) -> int:
    """(seed * 1_000_003 + rank * 7_919 + call) mod (2**63 - 1): a linear mix, not a hash.

    Nearby inputs give nearby seeds, which torch.Generator's seeding (Mersenne Twister)
    turns into unrelated streams; two (rank, call) pairs 7919 calls apart coincide.
    """
    return (seed * 1_000_003 + rank * 7_919 + call) % (2**63 - 1)
