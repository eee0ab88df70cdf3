"""Superposition metrics of a toy model's weight W (docs/metrics.md#superposition-in-toy-models).

Source: Elhage et al. 2022, "Toy Models of Superposition", transformer-circuits.pub/2022/toy_model
(sections "Superposition as a Phase Change" and "The Geometry of Superposition").

W has shape [m, n] (one model) or [I, m, n] (I instances); its column W_i (length m) is the
direction in which feature i is embedded, and W_i_hat = W_i / ||W_i||. Every function accepts
either shape and returns per-instance results with the instance dimension kept only when W
has one. Results are in W's dtype: pass float64 for exact values.
"""

from __future__ import annotations

import torch

FRACTIONS: tuple[tuple[str, float], ...] = (
    ("1", 1.0), ("3/4", 3 / 4), ("2/3", 2 / 3), ("1/2", 1 / 2), ("2/5", 2 / 5), ("3/8", 3 / 8), ("0", 0.0),
)
"""The values at which the paper finds feature dimensionalities cluster (label, value): 1
(a dedicated dimension), 3/4 (tetrahedron), 2/3 (triangle), 1/2 (antipodal pair / digon),
2/5 (pentagon), 3/8 (square antiprism); 0 for features that are not represented."""


def _batched(W: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if W.dim() == 2:
        return W.unsqueeze(0), True
    if W.dim() == 3:
        return W, False
    raise ValueError(f"W must have shape [m, n] or [instances, m, n], got {list(W.shape)}")


def feature_norms(W: torch.Tensor) -> torch.Tensor:
    """||W_i||, the length of each feature's direction: [n] or [I, n] (the paper's bar plots)."""
    Wb, single = _batched(W)
    out = torch.linalg.vector_norm(Wb, dim=1)
    return out[0] if single else out


def _overlaps(Wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared norms [I, n], overlaps [I, n, n] with entry (i, j) = W_i_hat . W_j)."""
    sq = (Wb * Wb).sum(dim=1)  # [I, n]
    norms = sq.sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    unit = Wb / safe.unsqueeze(1)  # a zero column stays zero
    return sq, torch.einsum("ami,amj->aij", unit, Wb)


def feature_dimensionality(W: torch.Tensor) -> torch.Tensor:
    """Feature dimensionality D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2, [n] or [I, n].

    The fraction of a hidden dimension that feature i occupies (Elhage et al. 2022, "The
    Geometry of Superposition"): the numerator is how much of the feature is represented, the
    denominator how many features share its direction (j runs over all features, i included,
    so the j = i term is ||W_i||^2 and 0 <= D_i <= 1). Known geometries: a feature alone in
    its direction (orthogonal to all others) has D_i = 1; an antipodal pair 1/2 each; a
    regular pentagon in a plane 2/5 each; k features forming a regular simplex in k - 1
    dimensions (k - 1)/k (triangle 2/3, tetrahedron 3/4).

    A zero column (feature not embedded at all) has no direction; we define D_i = 0 for it,
    the limit of a vanishing feature that overlaps any other.
    """
    Wb, single = _batched(W)
    sq, ov = _overlaps(Wb)
    denom = (ov * ov).sum(dim=-1)  # [I, n]; >= sq > 0 for a nonzero column
    D = torch.where(sq > 0, sq / torch.where(sq > 0, denom, torch.ones_like(denom)), torch.zeros_like(sq))
    return D[0] if single else D


def superposition(W: torch.Tensor) -> torch.Tensor:
    """Interference of feature i with the others, sum_{j != i} (W_i_hat . W_j)^2, [n] or [I, n].

    The paper's bar colour ("superposition"): 0 when W_i is orthogonal to every other column,
    growing as other features share its direction. 0 for a zero column.
    """
    Wb, single = _batched(W)
    sq, ov = _overlaps(Wb)
    out = (ov * ov).sum(dim=-1) - torch.diagonal(ov, dim1=-2, dim2=-1) ** 2
    out = out.clamp(min=0)  # the subtraction can round a few ulps below 0
    return out[0] if single else out


def dimensions_per_feature(W: torch.Tensor) -> torch.Tensor:
    """Dimensions per feature D* = m / ||W||_F^2, a scalar per instance ([] or [I]).

    ||W||_F^2 = sum_i ||W_i||^2 approximates the number of represented features (represented
    columns have norm ~1), so D* is the hidden dimensions divided by the features they store:
    1 with m orthogonal unit features, 1/2 with 2m features in antipodal pairs (Elhage et al.
    2022, "The Geometry of Superposition"). Infinite for W = 0 (no feature represented).
    """
    Wb, single = _batched(W)
    m = Wb.shape[1]
    out = m / (Wb * Wb).sum(dim=(1, 2))
    return out[0] if single else out


def represented_features(W: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Number of features with ||W_i|| > threshold, per instance (int64, [] or [I]).

    The paper reads representation off the bar plots of ||W_i||: trained norms are bimodal,
    near 1 for features the model reconstructs and near 0 for features it drops, so the
    default 0.5 separates the two modes and the count does not depend on its exact value.
    """
    norms = feature_norms(W)
    return (norms > threshold).sum(dim=-1)


def max_abs_cosine(W: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """max over pairs i != j (both in `mask`, default all nonzero columns) of |cos(W_i, W_j)|;
    0 when fewer than two columns qualify. [] or [I]. Orthogonal features give 0."""
    Wb, single = _batched(W)
    sq, ov = _overlaps(Wb)
    norms = sq.sqrt()
    cos = ov / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(1)
    keep = (sq > 0) if mask is None else (mask if not single else mask.unsqueeze(0)) & (sq > 0)
    pair = keep.unsqueeze(-1) & keep.unsqueeze(-2)
    pair &= ~torch.eye(Wb.shape[-1], dtype=torch.bool, device=W.device)
    out = torch.where(pair, cos.abs(), torch.zeros_like(cos)).amax(dim=(-2, -1))
    return out[0] if single else out


def nearest_fraction(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into FRACTIONS, |D - that fraction|) of the fraction closest to each D_i."""
    values = torch.tensor([v for _, v in FRACTIONS], dtype=D.dtype, device=D.device)
    dist = (D.unsqueeze(-1) - values).abs()
    best = dist.argmin(dim=-1)
    return best, dist.gather(-1, best.unsqueeze(-1)).squeeze(-1)


def fraction_label(D: float) -> str:
    """Label ("1", "3/4", ..., "0") of the fraction closest to one dimensionality value."""
    index, _ = nearest_fraction(torch.tensor([float(D)], dtype=torch.float64))
    return FRACTIONS[int(index)][0]


def fraction_shares(D: torch.Tensor, tolerance: float = 0.02) -> dict[str, float]:
    """Share of the given D_i values within `tolerance` of each fraction, plus "other" (none).

    Fractions 2/5 and 3/8 are 0.025 apart, so a tolerance <= 0.0125 assigns every value to at
    most one fraction; with a larger one a value goes to the nearest. Empty input gives {}.
    """
    flat = D.reshape(-1)
    if flat.numel() == 0:
        return {}
    best, dist = nearest_fraction(flat)
    close = dist <= tolerance
    shares = {label: float(((best == k) & close).double().mean()) for k, (label, _) in enumerate(FRACTIONS)}
    shares["other"] = float((~close).double().mean())
    return shares
