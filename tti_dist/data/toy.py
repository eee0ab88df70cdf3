"""Data of the Toy Models of Superposition (Elhage et al. 2022, transformer-circuits.pub).

The toy model reconstructs a vector x of n sparse features through a bottleneck of m < n
dimensions, h = W x, x' = ReLU(W^T h + b), trained on the importance-weighted loss
L = sum_i I_i (x_i - x'_i)^2. The data:

- Feature i is active independently with probability p (sparsity S = 1 - p). An active
  feature is uniform on [0, 1); an inactive one is exactly 0:

      x_i = a_i * u_i,   a_i ~ Bernoulli(p),   u_i ~ Uniform[0, 1),   all independent.

  So E[x_i] = p / 2, E[x_i^2] = p / 3 and P(x_i != 0) = p (up to the measure-zero u_i = 0).
- Importance I_i = decay ** i (the paper's default decay = 0.9): earlier features matter more.

Many small models ("instances") are trained in parallel, each with its own sparsity, so
`feature_probability` may be one number, one per instance ([num_instances]), or one per
instance and feature ([num_instances, num_features]).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from tti_dist.errors import ConfigError

FIELD_PREFIX = "toy"
"""Field-path prefix in error messages (`toy.feature_probability: ...`)."""


def _field(name: str) -> str:
    return f"{FIELD_PREFIX}.{name}"


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{_field(name)}: {value!r} is not allowed; use an integer >= 1")
    return value


def _check_probability_tensor(p: torch.Tensor) -> None:
    """Check the values of a CPU tensor (checking an accelerator tensor would sync the host)."""
    if p.device.type != "cpu" or p.numel() == 0:
        return
    bad = ~((p >= 0) & (p <= 1))  # also catches NaN
    if bool(bad.any()):
        value = p[bad].reshape(-1)[0].item()
        raise ConfigError(
            f"{_field('feature_probability')}: {value!r} is not allowed; "
            "use probabilities in [0, 1]"
        )


def sparse_feature_batch(
    batch_size: int,
    num_features: int,
    feature_probability: float | torch.Tensor,
    *,
    num_instances: int | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A batch of sparse toy features x_i = Bernoulli(p_i) * Uniform[0, 1) (Elhage et al. 2022).

    Args:
        batch_size: rows of the batch.
        num_features: n, features per example.
        feature_probability: p, the probability that a feature is active (sparsity
            S = 1 - p): a Python number, a 0-d tensor, a tensor of shape [num_instances] (one
            sparsity per instance) or [num_instances, num_features]. Tensor values are checked
            when the tensor is on the CPU; a tensor on an accelerator is used as is, because
            checking it would force a host sync every batch (values outside [0, 1] then act
            as 0 or 1).
        num_instances: models trained in parallel; None gives a [batch, num_features] batch
            unless `feature_probability` has an instance dimension, which then sets it.
        device: where to generate; default: the device of a tensor `feature_probability`,
            else of `generator`, else the CPU. Generated there directly (no host round trip).
        generator: a torch.Generator on `device`, for reproducible batches.
        dtype: floating dtype of the result.

    Returns:
        [batch_size, num_features] or [batch_size, num_instances, num_features]; entries are
        exactly 0 where inactive and in [0, 1) where active.

    Raises:
        ConfigError naming `toy.<argument>` for a bad size, a probability outside [0, 1] or a
        probability tensor whose shape does not fit.
    """
    _check_count(batch_size, "batch_size")
    _check_count(num_features, "num_features")
    if num_instances is not None:
        _check_count(num_instances, "num_instances")

    if isinstance(feature_probability, torch.Tensor):
        p = feature_probability
        if device is None:
            device = p.device
        if p.dim() == 0:
            _check_probability_tensor(p)
            p = p.reshape(())
        elif p.dim() in (1, 2):
            inst = p.shape[0]
            if num_instances is None:
                num_instances = inst
            if inst != num_instances or (p.dim() == 2 and p.shape[1] != num_features):
                want = f"[{num_instances}] or [{num_instances}, {num_features}]"
                raise ConfigError(
                    f"{_field('feature_probability')}: a tensor of shape {list(p.shape)} does not "
                    f"fit; use a number or a tensor of shape {want} (num_instances, num_features)"
                )
            _check_probability_tensor(p)
            if p.dim() == 1:
                p = p[:, None]
        else:
            raise ConfigError(
                f"{_field('feature_probability')}: a tensor with {p.dim()} dimensions is not "
                "allowed; use a number or a tensor of shape [num_instances] or "
                "[num_instances, num_features]"
            )
    elif isinstance(feature_probability, Real) and not isinstance(feature_probability, bool):
        value = float(feature_probability)
        if not (0.0 <= value <= 1.0):  # NaN fails too
            raise ConfigError(
                f"{_field('feature_probability')}: {feature_probability!r} is not allowed; "
                "use a probability in [0, 1]"
            )
        p = value
    else:
        raise ConfigError(
            f"{_field('feature_probability')}: {feature_probability!r} is not allowed; use a "
            "number in [0, 1] or a tensor of shape [num_instances] or [num_instances, num_features]"
        )

    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if isinstance(p, torch.Tensor):
        p = p.to(device=device, dtype=dtype, non_blocking=True)

    shape = (batch_size, num_features) if num_instances is None else (batch_size, num_instances, num_features)
    values = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    gate = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    # rand is in [0, 1): p = 0 activates nothing, p = 1 activates everything.
    return torch.where(gate < p, values, torch.zeros((), device=device, dtype=dtype))


def importance_weights(
    num_features: int,
    decay: float = 0.9,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Feature importances I_i = decay ** i for i = 0..num_features-1 (Elhage et al. 2022: 0.9).

    Computed as Python floats (float64 pow) and rounded once to `dtype`, so entries equal
    `decay ** i` exactly up to that rounding. Shape [num_features]; broadcast it against a
    [batch, (instances,) features] loss.
    """
    _check_count(num_features, "num_features")
    if isinstance(decay, bool) or not isinstance(decay, Real) or not math.isfinite(decay) or decay < 0:
        raise ConfigError(f"{_field('decay')}: {decay!r} is not allowed; use a finite number >= 0")
    values = [float(decay) ** i for i in range(num_features)]
    return torch.tensor(values, dtype=torch.float64).to(device=device, dtype=dtype)
