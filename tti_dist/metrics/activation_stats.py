"""Label-free statistics of a layer's activations: sparsity, unit density, Gaussian total
correlation, and the geometry of the units' weight directions.

DESIGN.md section 4 (L0, dead fraction / dense units, Gaussian TC of codes). Single-process
functions for `tti eval`: the driver gathers activations `acts_ND` ([N tokens, D units], the
full width, already gathered across tensor-parallel ranks) and calls these. Inputs may be
numpy arrays or CPU/GPU torch tensors (copied to host numpy, float16/bfloat16 upcast);
outputs are Python floats and float64 numpy arrays. Logarithms are natural (nats) unless
the name says log10.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DENSE_THRESHOLDS = (0.01, 0.1)
"""Densities above which a unit counts as dense (`dense_1pct_frac`, `dense_10pct_frac`)."""

_GRAM_CHUNK_ROWS = 1024
"""Rows of the normalized Gram matrix computed at once in `direction_cosines`."""


def as_numpy(x: Any) -> np.ndarray:
    """A host numpy array of `x` (numpy array, array-like, or torch tensor on any device;
    torch float16/bfloat16 are upcast to float32, which numpy can represent). No copy for
    numpy input."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        t = x.detach()
        if t.dtype.is_floating_point and t.element_size() < 4:
            t = t.float()
        return t.cpu().numpy()
    return np.asarray(x)


def _as_2d(acts: Any, where: str) -> np.ndarray:
    a = as_numpy(acts)
    if a.ndim != 2:
        raise ValueError(f"{where}: expected activations of shape [N, D], got shape {a.shape}")
    return a


def l0(acts_ND: Any) -> float:
    """Mean over tokens of the number of nonzero units (DESIGN section 4):

        L0 = (1/N) sum_n #{d : a_nd != 0}.

    Counts exact zeros only (no threshold): meaningful for ReLU/TopK/JumpReLU codes and SAE
    latents. For GELU/SiLU units nearly every entry is nonzero (GELU(x) = x Phi(x) is 0 only
    at x = 0 and where it underflows, x < about -14 in float32; it is small and negative
    otherwise for x < 0), so L0 is ~D there and says nothing about sparsity. nan for N = 0.
    """
    a = _as_2d(acts_ND, "l0")
    if a.shape[0] == 0:
        return math.nan
    return float(np.count_nonzero(a, axis=1).mean())


def unit_density(acts_ND: Any) -> np.ndarray:
    """float64 [D]: the share of tokens on which each unit is nonzero (exact zeros, as `l0`):

        density_d = #{n : a_nd != 0} / N.

    mean(density) * D = L0. All nan for N = 0.
    """
    a = _as_2d(acts_ND, "unit_density")
    if a.shape[0] == 0:
        return np.full(a.shape[1], math.nan)
    return np.count_nonzero(a, axis=0).astype(np.float64) / a.shape[0]


def dead_and_dense(density_D: Any) -> dict[str, float]:
    """Dead and dense shares of units from their densities (DESIGN section 4; eval-set
    variant of the dead fraction, density == 0 on the eval tokens):

        dead_frac        = #{d : density_d == 0} / D
        dense_1pct_frac  = #{d : density_d > 0.01} / D
        dense_10pct_frac = #{d : density_d > 0.1} / D

    Also `num_units` (D). Shares are nan for D = 0.
    """
    d = as_numpy(density_D).astype(np.float64).reshape(-1)
    num = d.size
    share = (lambda m: float(np.count_nonzero(m)) / num) if num else (lambda m: math.nan)
    return {
        "dead_frac": share(d == 0),
        "dense_1pct_frac": share(d > DENSE_THRESHOLDS[0]),
        "dense_10pct_frac": share(d > DENSE_THRESHOLDS[1]),
        "num_units": num,
    }


def density_histogram(density_D: Any, num_bins: int = 24, min_log10: float = -6.0) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of log10(unit density) for TensorBoard (`add_histogram_raw`-style limits):

        counts: int64 [num_bins + 1], edges: float64 [num_bins + 2].

    Bins 1..num_bins split [min_log10, 0] evenly (edges[1] = min_log10, edges[-1] = 0); a live
    unit with log10(density) < min_log10 is counted in bin 1. Bin 0 holds the dead units
    (density == 0) only: it is drawn one bin width left of the range,
    [min_log10 - width, min_log10). On an eval set of N tokens the smallest nonzero density
    is 1/N (log10 = -4.2 for 16k tokens), so the default range (1e-6 .. 1, a quarter decade
    per bin) keeps the same bins across eval sets and steps.
    """
    if num_bins < 1:
        raise ValueError(f"density_histogram: num_bins must be >= 1, got {num_bins}")
    if not min_log10 < 0:
        raise ValueError(f"density_histogram: min_log10 must be < 0, got {min_log10}")
    d = as_numpy(density_D).astype(np.float64).reshape(-1)
    live_edges = np.linspace(min_log10, 0.0, num_bins + 1)
    width = live_edges[1] - live_edges[0]
    edges = np.concatenate([[min_log10 - width], live_edges])
    counts = np.zeros(num_bins + 1, dtype=np.int64)
    dead = d == 0
    counts[0] = np.count_nonzero(dead)
    logd = np.log10(d[~dead])
    idx = np.clip(np.floor((logd - min_log10) / width).astype(np.int64), 0, num_bins - 1)
    counts[1:] = np.bincount(idx, minlength=num_bins)
    return counts, edges


def gaussian_total_correlation(acts_ND: Any) -> dict[str, float | int]:
    """Total correlation of the units under a Gaussian fit (DESIGN section 4, "Gaussian TC of
    codes (no labels)"):

        TC = 1/2 (sum_d log S_dd - log det S) = -1/2 log det R,

    S the sample covariance of the units over the N tokens (float64), R = diag(S)^-1/2 S
    diag(S)^-1/2 their correlation matrix (the two forms are equal; R is used, with slogdet,
    for conditioning). Total correlation TC = KL(p(z) || prod_d p(z_d)) is Watanabe's (1960,
    "Information theoretical analysis of multivariate correlation") multivariate
    generalization of mutual information; for a Gaussian it has this closed form (two units
    with correlation rho: TC = -1/2 log(1 - rho^2)). It is 0 iff S is diagonal, and it only
    sees second-order (linear) dependence.

    Constant units (max == min over the tokens: dead units, zero variance) are left out;
    `num_units_used` says how many remain. TC = 0 with fewer than 2 units used; nan for
    N < 2; inf when R is singular (exactly collinear units, or N <= number of units used).
    """
    a = _as_2d(acts_ND, "gaussian_total_correlation")
    num_tokens = a.shape[0]
    if num_tokens < 2:
        return {"tc": math.nan, "num_units_used": 0}
    keep = a.max(axis=0) > a.min(axis=0)
    num_used = int(np.count_nonzero(keep))
    if num_used < 2:
        return {"tc": 0.0, "num_units_used": num_used}
    x = a[:, keep].astype(np.float64)
    x -= x.mean(axis=0)
    cov = (x.T @ x) / (num_tokens - 1)
    inv_std = 1.0 / np.sqrt(np.diag(cov))
    corr = cov * inv_std[:, None] * inv_std[None, :]
    sign, logdet = np.linalg.slogdet(corr)
    tc = math.inf if sign <= 0 else max(-0.5 * float(logdet), 0.0)
    return {"tc": tc, "num_units_used": num_used}


def direction_cosines(W_KD: Any) -> dict[str, float | int]:
    """Pairwise |cosine| between the K rows of a weight matrix (the units' directions, e.g.
    the MLP input weights W_in [d_ff, d_model], one row per neuron):

        c_ij = |w_i . w_j| / (||w_i|| ||w_j||),   i != j,
        mean_abs_cos     = mean over ordered pairs i != j of c_ij,
        max_abs_cos      = max over pairs i != j of c_ij,
        mean_max_abs_cos = (1/K) sum_i max_{j != i} c_ij   (how close each unit's nearest
                           other direction is; the |.| form of DESIGN's "redundancy").

    Orthogonal directions give 0; superposition (more units than dimensions, Elhage et al.
    2022, "Toy Models of Superposition") forces mean_abs_cos > 0. Rows of zero norm are left
    out (`num_rows_used`); nan with fewer than 2 rows left. float64, Gram matrix in chunks of
    rows (K = 3072 fits easily).
    """
    w = as_numpy(W_KD)
    if w.ndim != 2:
        raise ValueError(f"direction_cosines: expected a weight matrix of shape [K, D], got shape {w.shape}")
    w = w.astype(np.float64)
    norms = np.linalg.norm(w, axis=1)
    w = w[norms > 0] / norms[norms > 0, None]
    num_rows = w.shape[0]
    if num_rows < 2:
        return {"mean_abs_cos": math.nan, "max_abs_cos": math.nan, "mean_max_abs_cos": math.nan,
                "num_rows_used": num_rows}
    total, max_cos, sum_row_max = 0.0, 0.0, 0.0
    for start in range(0, num_rows, _GRAM_CHUNK_ROWS):
        stop = min(start + _GRAM_CHUNK_ROWS, num_rows)
        g = np.abs(w[start:stop] @ w.T)
        rows = np.arange(stop - start)
        g[rows, start + rows] = 0.0  # the diagonal (cos = 1 with itself)
        np.minimum(g, 1.0, out=g)  # rounding of normalized rows
        total += float(g.sum())
        row_max = g.max(axis=1)
        sum_row_max += float(row_max.sum())
        max_cos = max(max_cos, float(row_max.max()))
    return {
        "mean_abs_cos": total / (num_rows * (num_rows - 1)),
        "max_abs_cos": max_cos,
        "mean_max_abs_cos": sum_row_max / num_rows,
        "num_rows_used": num_rows,
    }
