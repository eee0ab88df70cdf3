"""Settings of weight-sparse training (`weight_sparsity:`), after Gao et al. 2025.

The section is field-checked here; what needs the model's layout (which matrices the globs
select, whether each can hold `min_per_neuron` nonzeros per neuron at the target density)
is checked in tti_dist.models.weight_sparsity.selected_matrices, before any process starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tti_dist.errors import ConfigError

DEFAULT_MATRICES = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")
"""Every dense block's four weight matrices (the layers Gao et al. sparsify besides the
embeddings and biases)."""


@dataclass(frozen=True)
class WeightSparsityConfig:
    """Weight sparsity: each selected matrix keeps only its largest-|w| entries after every step.

    AbsTopK on weights (Gao et al. 2025, "Weight-sparse transformers have interpretable
    circuits"); docs/methods.md has the formula, the schedule and what differs from the paper."""

    density: float = 0.25
    """Target fraction of nonzero weights kept in each selected matrix, in (0, 1]. Every
    matrix keeps the same fraction, floor(density x its element count) weights (Gao et al.)."""
    anneal_fraction: float = 0.5
    """The kept fraction falls linearly from 1 (dense) at step 0 to `density` at step
    anneal_fraction x train.steps and stays there; 0 = sparse from the first step. In [0, 1].
    Gao et al. anneal over the first half of training."""
    min_per_neuron: int = 0
    """Each neuron keeps at least this many of its weights (its largest |w|), so no unit is
    cut off: the output units of a column-parallel matrix (attn.qkv, mlp.fc1: per row) and
    the input units of a row-parallel one (attn.proj, mlp.fc2: per column, i.e. per MLP
    unit / attention channel). Gao et al. use 4. >= 0; must fit the target density."""
    matrices: tuple[str, ...] = DEFAULT_MATRICES
    """Globs over the blocks' linear layers (module paths, e.g. blocks.0.mlp.fc1) whose weight
    is sparsified. Dense blocks' attn.qkv, attn.proj, mlp.fc1 and mlp.fc2 can be selected;
    biases, embeddings, norms, routers, experts and the bottleneck stay dense."""

    def validate(self, where: str = "weight_sparsity") -> None:
        """Field checks (ConfigError, one line); the layout checks are in models.weight_sparsity."""
        if not (isinstance(self.density, (int, float)) and math.isfinite(self.density) and 0 < self.density <= 1):
            raise ConfigError(f"{where}.density: {self.density!r} must be a number in (0, 1]")
        if not (math.isfinite(self.anneal_fraction) and 0 <= self.anneal_fraction <= 1):
            raise ConfigError(f"{where}.anneal_fraction: {self.anneal_fraction!r} must be a number in [0, 1]")
        if not isinstance(self.min_per_neuron, int) or self.min_per_neuron < 0:
            raise ConfigError(f"{where}.min_per_neuron: {self.min_per_neuron!r} must be an integer >= 0")
        if not self.matrices:
            raise ConfigError(f"{where}.matrices: [] selects nothing; give at least one glob, e.g. 'blocks.*.mlp.fc1'")

    def density_at(self, step: int, total_steps: int) -> float:
        """The kept fraction after optimizer step `step` (1-based) of `total_steps`:
        1 - (1 - density) min(1, step / (anneal_fraction total_steps)), or density when
        anneal_fraction is 0."""
        end = self.anneal_fraction * total_steps
        progress = 1.0 if end <= 0 else min(1.0, step / end)
        return 1.0 - (1.0 - self.density) * progress
