"""`ToyConfig`: the settings of `tti toy` (Toy Models of Superposition), YAML loading, validation.

A toy config is a flat YAML mapping of the fields below (configs/toy_superposition.yaml);
`experiment` picks what it runs: a sparsity sweep of n features in m dimensions, or the
n = 2, m = 1 phase diagram over sparsity and relative importance (configs/toy_phase_diagram.yaml).
`--set key=value` overrides a field (`--set toy.key=value` is accepted too). Loading is strict
(unknown keys name the closest valid one) and every error is one line naming `toy.<field>`,
the value given and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tti_dist.config.load import apply_override, config_to_dict, read_yaml_mapping
from tti_dist.config.sections import section_from_dict
from tti_dist.errors import ConfigError

PREFIX = "toy."
"""Field-path prefix of toy settings in error messages (`toy.num_hidden: ...`)."""

DEFAULT_SPARSITIES: tuple[float, ...] = tuple(round(1.0 - 100.0 ** (-k / 11), 4) for k in range(12))
"""S = 1 - p with density p = 100^(-k/11), k = 0..11: 12 values from 0 (dense) to 0.99, evenly
spaced in log(1 / (1 - S)) (the x axis of the paper's dimensionality figure)."""

DEFAULT_RELATIVE_IMPORTANCES: tuple[float, ...] = tuple(float(f"{10.0 ** (k / 6 - 1):.4g}") for k in range(13))
"""r = 10^(k/6 - 1), k = 0..12: 13 values from 0.1 to 10 (1 in the middle), evenly spaced in
log r (the x axis of the paper's phase diagram)."""

EXPERIMENTS = ("sparsity_sweep", "phase_diagram")
"""What `tti toy` runs (the `experiment` field)."""


@dataclass(frozen=True)
class ToyConfig:
    """Batched toy models x' = ReLU(W^T W x + b) (Elhage et al. 2022): a sparsity sweep or a phase diagram.

    sparsity_sweep: every (sparsity, repeat) pair is one model instance; instance i has
    sparsity `sparsities[i // instances_per_sparsity]` and repeat `i % instances_per_sparsity`.
    phase_diagram: every (sparsity, relative importance, restart) triple is one instance, in
    that order (restarts innermost), with importances [1, r]. Either way all instances are
    trained together as one batched tensor program (W [instances, m, n], b [instances, n]) on
    the sum of their losses, so they train independently.
    """

    experiment: Literal["sparsity_sweep", "phase_diagram"] = "sparsity_sweep"
    """What to run. sparsity_sweep: n features in m dimensions at each of `sparsities`, with
    importance decay ** i (the dimensionality and W^T W figures). phase_diagram: n = 2 features
    in m = 1 dimension on the grid `sparsities` x `relative_importances`, feature 1 of importance
    1 and feature 2 of importance r, the best of `instances_per_sparsity` restarts per cell
    classified as not represented / dedicated dimension / superposition (the paper's phase
    diagram; tti_dist.toy.phase)."""

    num_features: int = 20
    """n, the number of input features (>= 2)."""
    num_hidden: int = 8
    """m, the hidden dimensions of the bottleneck h = W x; 1 <= m < n (superposition needs
    fewer dimensions than features). With n = 20, m = 8 the fully superposed state has
    D* = 2/5, inside the range of the paper's sticky fractions."""
    importance_decay: float = 0.9
    """Feature importance I_i = decay ** i (i = 0..n-1) weighting the squared error; in (0, 1].
    The paper uses 0.9; 1.0 makes all features equally important. A phase_diagram uses
    [1, r] instead (`relative_importances`)."""
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    """The sweep: sparsity S (probability that a feature is zero) of each group of instances,
    each in [0, 1). A feature is active with probability 1 - S and then Uniform[0, 1)."""
    instances_per_sparsity: int = 2
    """Independently initialised repeats per sparsity (different draws of one seeded generator);
    in a phase_diagram, the restarts per (sparsity, relative importance) cell, of which the one
    with the lowest expected loss is kept."""
    relative_importances: tuple[float, ...] = DEFAULT_RELATIVE_IMPORTANCES
    """phase_diagram only: the importance r of feature 2 (feature 1 has importance 1) of each
    column of the grid, each finite and > 0. Ignored by a sparsity_sweep."""
    steps: int = 4000
    """Optimizer steps (one batch of `batch_size` examples per instance per step)."""
    batch_size: int = 256
    """Examples per instance per step (fresh samples every step; there is no dataset). The
    paper uses 1024 for 10,000 steps; 256 with lr 1e-2 reaches the same solutions on a CPU
    in a fraction of the time."""
    lr: float = 1e-2
    """Peak Adam learning rate (the paper: 1e-3, constant, for 10,000 steps)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate schedule over `steps`: constant, linear decay to 0, or cosine decay to 0
    (the schedules of the paper's notebook)."""
    seed: int = 0
    """Seed of the private generator for initialisation and data (the global RNG is untouched);
    the same config gives the same weights."""
    l1_hidden: float = 0.0
    """Coefficient of the L1 penalty on the hidden activation: mean over examples and hidden
    dims of |h|, h = W x (the project's `l1` regularizer on the bottleneck); >= 0, 0 = off."""
    orthogonality: float = 0.0
    """Coefficient of the soft orthogonality penalty on the feature directions W_i (columns of
    W): mean over ordered pairs i != j of cos(W_i, W_j)^2, exact full Gram (the project's
    `orthogonality` regularizer, mode full); >= 0, 0 = off."""
    topk_hidden: int = 0
    """Top-k on the hidden activation: keep the k entries of h with the largest |h| per example
    (the others set to 0) before W^T, so x' = ReLU(W^T topk(W x) + b); 0 = off, else 1..m."""
    represented_threshold: float = 0.5
    """A feature counts as represented when its column norm ||W_i|| exceeds this (> 0). Learned
    norms are near 1 (represented) or near 0 (dropped); 0.5 separates the two modes."""
    eval_batch_size: int = 8192
    """Examples per instance of the fresh batch on which the final loss is reported."""
    log_every: int = 1000
    """Log the training loss every this many steps (host syncs only then); 0 = never."""
    device: str = "cpu"
    """Torch device to train on ('cpu', 'cuda', 'cuda:1', ...)."""
    num_threads: int = 1
    """CPU threads of torch during training (restored afterwards); 0 = leave torch's setting.
    The toy's tensors are small: one thread is fastest, and several threads on a busy machine
    can be several times slower."""

    @property
    def num_instances(self) -> int:
        """Models in the batched program: len(sparsities) * instances_per_sparsity, times
        len(relative_importances) in a phase_diagram."""
        cells = len(self.relative_importances) if self.experiment == "phase_diagram" else 1
        return len(self.sparsities) * cells * self.instances_per_sparsity

    def instance_sparsities(self) -> list[float]:
        """The sparsity of each instance, in instance order (each value repeated)."""
        cells = len(self.relative_importances) if self.experiment == "phase_diagram" else 1
        return [s for s in self.sparsities for _ in range(cells * self.instances_per_sparsity)]

    def instance_relative_importances(self) -> list[float]:
        """phase_diagram: the relative importance r of each instance, in instance order."""
        k = self.instances_per_sparsity
        return [r for _ in self.sparsities for r in self.relative_importances for _ in range(k)]

    def validate(self) -> ToyConfig:
        """Raise ConfigError (one line naming `toy.<field>`, value, what is allowed); return self."""
        for name in ("num_features", "num_hidden", "instances_per_sparsity", "steps", "batch_size",
                     "eval_batch_size"):
            _check_int(getattr(self, name), name, minimum=1)
        for name in ("seed", "topk_hidden", "log_every", "num_threads"):
            _check_int(getattr(self, name), name, minimum=0)
        if self.num_features < 2:
            _fail("num_features", self.num_features, "use an integer >= 2")
        if self.num_hidden >= self.num_features:
            _fail("num_hidden", self.num_hidden,
                  f"use 1..{self.num_features - 1} (fewer hidden dimensions than num_features = {self.num_features})")
        if self.topk_hidden > self.num_hidden:
            _fail("topk_hidden", self.topk_hidden, f"use 0 (off) or 1..num_hidden ({self.num_hidden})")
        if not self.sparsities:
            _fail("sparsities", list(self.sparsities), "give at least one sparsity in [0, 1)")
        for i, s in enumerate(self.sparsities):
            if not (_is_number(s) and 0.0 <= s < 1.0):
                _fail(f"sparsities[{i}]", s, "use a sparsity in [0, 1) (S = 1 is all-zero data)")
        if not (_is_number(self.importance_decay) and 0.0 < self.importance_decay <= 1.0):
            _fail("importance_decay", self.importance_decay, "use a number in (0, 1]")
        if not (_is_number(self.lr) and self.lr > 0):
            _fail("lr", self.lr, "use a finite number > 0")
        for name in ("l1_hidden", "orthogonality"):
            value = getattr(self, name)
            if not (_is_number(value) and value >= 0):
                _fail(name, value, "use a finite coefficient >= 0 (0 = off)")
        if not (_is_number(self.represented_threshold) and self.represented_threshold > 0):
            _fail("represented_threshold", self.represented_threshold, "use a finite number > 0")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            _fail("lr_schedule", self.lr_schedule, "choose one of 'constant', 'linear', 'cosine'")
        if self.experiment not in EXPERIMENTS:
            _fail("experiment", self.experiment, "choose one of " + ", ".join(map(repr, EXPERIMENTS)))
        if self.experiment == "phase_diagram":
            self._check_phase_diagram()
        self._check_device()
        return self

    def _check_phase_diagram(self) -> None:
        why = "the phase diagram is n = 2 features in m = 1 dimension (experiment 'phase_diagram')"
        if self.num_features != 2:
            _fail("num_features", self.num_features, f"use 2; {why}")
        if self.num_hidden != 1:
            _fail("num_hidden", self.num_hidden, f"use 1; {why}")
        if not self.relative_importances:
            _fail("relative_importances", list(self.relative_importances), "give at least one importance > 0")
        for i, r in enumerate(self.relative_importances):
            if not (_is_number(r) and r > 0):
                _fail(f"relative_importances[{i}]", r, "use a finite importance > 0")

    def _check_device(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            _fail("device", self.device, "use a torch device such as 'cpu' or 'cuda'")
        if device.type == "cuda" and not torch.cuda.is_available():
            _fail("device", self.device, "CUDA is not available here; use 'cpu'")
        if device.type not in ("cpu", "cuda"):
            _fail("device", self.device, "use 'cpu' or 'cuda[:N]'")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{PREFIX}{field}: {value!r} is not allowed; {allowed}")


def _check_int(value: Any, field: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"use an integer >= {minimum}")


def load_toy_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ToyConfig:
    """Read a flat YAML toy config (defaults when `path` is None), apply `key=value` overrides,
    build it strictly and validate it. Raises ConfigError (one line) on any mistake."""
    raw = read_yaml_mapping(path, "a mapping of toy settings")
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.strip().startswith(PREFIX):
            override = key.strip()[len(PREFIX):] + "=" + value
        apply_override(raw, override)
    return section_from_dict(ToyConfig, raw, PREFIX).validate()


def toy_config_to_dict(cfg: ToyConfig) -> dict[str, Any]:
    """A plain YAML-serialisable mapping of the config (what RUN/config.yaml holds)."""
    return config_to_dict(cfg)
