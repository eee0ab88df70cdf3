"""Label-free statistics of a layer's activations: sparsity, unit density, Gaussian total
correlation, and the geometry of the units' weight directions.

Definitions in docs/metrics.md (L0, dead fraction / dense units, Gaussian TC of codes). Which of these
compare across layer widths D and eval sizes N, and why: docs/evaluation.md, "Width and
sample size". Single-process
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
from scipy.special import digamma

DENSE_THRESHOLDS = (0.01, 0.1)
"""Densities above which a unit counts as dense (`dense_1pct_frac`, `dense_10pct_frac`)."""

_GRAM_CHUNK_ROWS = 1024
"""Rows of the normalized Gram matrix computed at once in `direction_cosines`."""

TC_NOISE_FLOOR = 0.01
"""Variance, relative to each unit's own variance, of the independent Gaussian noise through
which `gaussian_tc_per_unit` observes the units (a 1% floor, 20 dB signal-to-noise per unit):
part of the definition of the `gaussian_tc_per_unit_bc` tag. A new value needs a new tag."""

TC_SEED = 0
"""Seed of the noise (and of the unit subset when N <= D) of `gaussian_tc_per_unit`."""


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
    """Mean over tokens of the number of nonzero units (docs/metrics.md#l0):

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
    """Dead and dense shares of units from their densities (docs/metrics.md#dead-and-dense-units; eval-set
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
    """Plug-in total correlation of the units under a Gaussian fit (the Gaussian TC of codes,
    no labels needed; docs/metrics.md#total-correlation):

        TC = 1/2 (sum_d log S_dd - log det S) = -1/2 log det R,

    S the sample covariance of the units over the N tokens (float64), R = diag(S)^-1/2 S
    diag(S)^-1/2 their correlation matrix (the two forms are equal; R is used, with slogdet,
    for conditioning). Total correlation TC = KL(p(z) || prod_d p(z_d)) is Watanabe's (1960,
    "Information theoretical analysis of multivariate correlation") multivariate
    generalization of mutual information; for a Gaussian it has this closed form (two units
    with correlation rho: TC = -1/2 log(1 - rho^2)). It is 0 iff S is diagonal, and it only
    sees second-order (linear) dependence.

    This plug-in value is biased upward by `gaussian_tc_bias(D, N)` (about D(D-1)/(4N) nats:
    4.1 for D = 256 and 70 for D = 1024 independent units at N = 4096), infinite when N <= D,
    and grows with the number of units even at a fixed per-unit redundancy: never compare it
    across widths or sample sizes. `tti eval` reports `gaussian_tc_per_unit` instead.

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


def gaussian_tc_bias(num_units: int, num_tokens: int) -> float:
    """Exact bias in nats of the plug-in Gaussian TC (`gaussian_total_correlation`) of D =
    `num_units` jointly Gaussian units from N = `num_tokens` i.i.d. tokens, whatever their
    covariance Sigma:

        b(D, N) = E[TC_plugin] - TC(Sigma) = 1/2 sum_{i=1}^{D-1} [psi(n/2) - psi((n - i)/2)],

    n = N - 1 (the sample mean is subtracted), psi the digamma function. From the Wishart
    distribution of (N - 1) S ~ W_D(Sigma, n): E log det S = log det Sigma + sum_{i=1}^{D}
    psi((n - i + 1)/2) - D log(n/2), and for each diagonal entry (the D = 1 case)
    E log S_dd = log Sigma_dd + psi(n/2) - log(n/2) (Muirhead 1982, "Aspects of Multivariate
    Statistical Theory", Thm 3.2.15); the log(n/2) terms cancel in TC, and the bias does not
    depend on Sigma. Subtracting it is the unbiased entropy estimator of a multivariate normal
    (Ahmed & Gokhale 1989, "Entropy expressions and their estimators for multivariate
    distributions", IEEE Trans. Inf. Theory 35(3); Misra, Singh & Demchuk 2005, J.
    Multivariate Anal. 92) applied to the joint and to each marginal. For D << N,
    b ~ D(D - 1)/(4n); exactly 4.07 nats for D = 256 and 70.09 for D = 1024 at N = 4096.
    Needs 1 <= D <= n (the estimate exists); 0 for D = 1.
    """
    num_units, num_tokens = int(num_units), int(num_tokens)
    n = num_tokens - 1
    if num_units < 1 or num_units > n:
        raise ValueError(f"gaussian_tc_bias: needs 1 <= num_units <= num_tokens - 1, got {num_units} units "
                         f"and {num_tokens} tokens")
    i = np.arange(1, num_units, dtype=np.float64)
    return 0.5 * float(np.sum(digamma(n / 2.0) - digamma((n - i) / 2.0)))


def gaussian_tc_per_unit(acts_ND: Any, noise_floor: float = TC_NOISE_FLOOR,
                         seed: int = TC_SEED) -> dict[str, float | int]:
    """Bias-corrected Gaussian total correlation per unit (tag `gaussian_tc_per_unit_bc`): a
    redundancy measure that is finite for any layer and compares across widths D and eval
    sizes N.

        y_nd  = (a_nd - mean_d) / std_d + sqrt(eps) g_nd,      g_nd ~ N(0, 1) i.i.d. (seeded)
        TC_bc = -1/2 log det R_y - b(k, N),                    R_y the sample correlation of y
        value = TC_bc / k,

    over the k units used (below), eps = `noise_floor` (TC_NOISE_FLOOR = 0.01), b the exact
    Wishart bias of `gaussian_tc_bias`. Three parts, each fixing one defect of the plug-in
    (which must never be compared across widths or sample sizes uncorrected):

    - Bias correction (Ahmed & Gokhale 1989; `gaussian_tc_bias`): the plug-in is biased up by
      b(D, N) ~ D(D-1)/(4N) nats for every covariance, so subtracting b gives an unbiased
      estimate for Gaussian units of any correlation. Measured on independent units at
      N = 4096: Gaussian |value| <= 5e-4 nats/unit for D = 256..4000 (plug-in/D: 0.016 at
      D = 256, 0.069 at D = 1024); ReLU-sparse units of density 2% <= 4e-4, of density 0.5%
      (20 nonzeros per unit) <= 0.007. With few nonzeros per unit (N = 256 at density 0.5%)
      sparse units read 0.1 to 0.5 nats/unit too high: compare at equal N.
    - Noise floor: the units are observed through independent Gaussian noise of eps times their
      variance, i.e. this is the Gaussian TC of correlation (P + eps I) / (1 + eps), P the
      units' correlation matrix. Exactly linearly dependent units (MLP pre-activations:
      4 d units in a d-dimensional subspace; router probabilities summing to 1) have
      infinite TC, which the plug-in reports as inf or as ~15 nats per null direction of
      float32 rounding; with the floor each null direction adds 1/2 log((1 + eps)/eps) =
      2.31 nats, independent of rounding and precision. For well-conditioned P the floor
      changes little (equicorrelated rho = 0.3: -1.2%).
    - Per unit: TC of k units with the same pairwise structure grows ~linearly in k (k/4
      blocks of 4 correlated units: k/4 times the block's TC), so the total is divided by k.
      A layer whose units are all dead but a few is judged on its live units; dead_frac
      reports the rest.

    Units: constant units (max == min over the tokens: dead, zero variance) are left out,
    and each unit's noise depends only on its index (not on the width or on which other
    units are live), so a unit going dead never moves the others' contribution. k = the
    number of live units when that is at most N - 1, else (N <= live units) a seeded random
    subset of N - 1 live units.
    The subset value estimates the per-unit TC averaged over (N-1)-subsets, a lower bound of
    the whole layer's (Han 1978, "Nonnegative entropy measures of multivariate symmetric
    correlations": that average is nondecreasing in the subset size), so compare only evals
    with N > D. Not clipped at 0: independent units read slightly negative half the time.

    Why not the alternatives: a fixed random subset with N >= 10 k discards most of a wide
    layer and is itself width-dependent (Han's bound); Ledoit-Wolf shrinkage fits its
    intensity to the data, so the value moves with D/N, and has no closed-form bias; the
    plug-in divided by D alone keeps a per-unit bias ~(D - 1)/(4N) that grows with width.
    The correction here is exact for Gaussian units at every correlation and uses every unit.

    With `noise_floor=0` this is the unbiased estimate of TC / k itself (inf when R is
    singular). Returns `tc_per_unit`, `tc` (TC_bc, nats), `tc_plugin` (-1/2 log det R_y),
    `bias` (b(k, N)), `num_units_used` (k), `num_live_units`, `num_tokens`; the values are nan
    for N < 2 and 0 with fewer than 2 units used.
    """
    if not noise_floor >= 0:
        raise ValueError(f"gaussian_tc_per_unit: noise_floor must be >= 0, got {noise_floor}")
    a = _as_2d(acts_ND, "gaussian_tc_per_unit")
    num_tokens, dim = a.shape
    live = np.flatnonzero(a.max(axis=0) > a.min(axis=0)) if num_tokens else np.zeros(0, dtype=np.int64)
    out: dict[str, float | int] = {"tc_per_unit": 0.0, "tc": 0.0, "tc_plugin": 0.0, "bias": 0.0,
                                   "num_units_used": 0, "num_live_units": int(live.size), "num_tokens": num_tokens}
    if num_tokens < 2:
        out.update(tc_per_unit=math.nan, tc=math.nan, tc_plugin=math.nan, bias=math.nan)
        return out
    rng = np.random.default_rng(seed)
    units = live
    if live.size > num_tokens - 1:
        units = np.sort(rng.choice(live, size=num_tokens - 1, replace=False))
    out["num_units_used"] = int(units.size)
    if units.size < 2:
        return out
    x = a[:, units].astype(np.float64)
    x -= x.mean(axis=0)
    x /= np.sqrt((x * x).mean(axis=0))
    if noise_floor > 0:
        # Column-major draw: unit d's noise is the d-th block of N normals, the same whatever
        # the width or which other units are live.
        noise = np.random.default_rng([seed, 1]).standard_normal((int(units[-1]) + 1, num_tokens), dtype=np.float32)
        x += math.sqrt(noise_floor) * noise[units].T
        x -= x.mean(axis=0)
    cov = x.T @ x
    inv_std = 1.0 / np.sqrt(np.diag(cov))
    corr = cov * inv_std[:, None] * inv_std[None, :]
    sign, logdet = np.linalg.slogdet(corr)
    plugin = math.inf if sign <= 0 else -0.5 * float(logdet)
    bias = gaussian_tc_bias(units.size, num_tokens)
    out.update(tc_plugin=plugin, bias=bias, tc=plugin - bias, tc_per_unit=(plugin - bias) / units.size)
    return out


def direction_cosines(W_KD: Any) -> dict[str, float | int]:
    """Pairwise |cosine| between the K rows of a weight matrix (the units' directions, e.g.
    the MLP input weights W_in [d_ff, d_model], one row per neuron), in D dimensions:

        c_ij = |w_i . w_j| / (||w_i|| ||w_j||),   i != j,
        mean_abs_cos     = mean over ordered pairs i != j of c_ij,
        max_abs_cos      = max over pairs i != j of c_ij,
        mean_max_abs_cos = (1/K) sum_i max_{j != i} c_ij   (how close each unit's nearest
                           other direction is; the |.| form of an SAE's decoder redundancy),
        mean_sq_cos      = mean over ordered pairs i != j of c_ij^2,
        mean_sq_cos_rel  = D * mean_sq_cos.

    Orthogonal directions give 0; superposition (more units than dimensions, Elhage et al.
    2022, "Toy Models of Superposition") forces mean_abs_cos > 0. The first four depend on the
    dimension D even for structureless directions: for independent uniformly random
    directions E c_ij^2 = 1/D exactly, E c_ij ~ sqrt(2 / (pi D)) (0.14 at D = 32, 0.029 at
    D = 768), and the max over K^2/2 pairs grows with K. `mean_sq_cos_rel` removes the
    width: 1 for random directions at any D; Welch's bound (Welch 1974, "Lower bounds on the
    maximum cross correlation of signals", IEEE Trans. Inf. Theory 20(3): sum_{i,j} c_ij^2 >=
    K^2 / D) makes (K - D)/(K - 1) its minimum for K > D unit vectors (0.75 at K = 4D,
    reached by tight frames), 0 for K <= D orthogonal rows.

    Rows of zero norm are left out (`num_rows_used`); nan with fewer than 2 rows left.
    float64, Gram matrix in chunks of rows (K = 3072 fits easily).
    """
    w = as_numpy(W_KD)
    if w.ndim != 2:
        raise ValueError(f"direction_cosines: expected a weight matrix of shape [K, D], got shape {w.shape}")
    w = w.astype(np.float64)
    norms = np.linalg.norm(w, axis=1)
    w = w[norms > 0] / norms[norms > 0, None]
    num_rows, dim = w.shape
    if num_rows < 2:
        return {"mean_abs_cos": math.nan, "max_abs_cos": math.nan, "mean_max_abs_cos": math.nan,
                "mean_sq_cos": math.nan, "mean_sq_cos_rel": math.nan, "num_rows_used": num_rows}
    total, total_sq, max_cos, sum_row_max = 0.0, 0.0, 0.0, 0.0
    for start in range(0, num_rows, _GRAM_CHUNK_ROWS):
        stop = min(start + _GRAM_CHUNK_ROWS, num_rows)
        g = np.abs(w[start:stop] @ w.T)
        rows = np.arange(stop - start)
        g[rows, start + rows] = 0.0  # the diagonal (cos = 1 with itself)
        np.minimum(g, 1.0, out=g)  # rounding of normalized rows
        total += float(g.sum())
        total_sq += float(np.einsum("ij,ij->", g, g))
        row_max = g.max(axis=1)
        sum_row_max += float(row_max.sum())
        max_cos = max(max_cos, float(row_max.max()))
    num_pairs = num_rows * (num_rows - 1)
    return {
        "mean_abs_cos": total / num_pairs,
        "max_abs_cos": max_cos,
        "mean_max_abs_cos": sum_row_max / num_rows,
        "mean_sq_cos": total_sq / num_pairs,
        "mean_sq_cos_rel": dim * total_sq / num_pairs,
        "num_rows_used": num_rows,
    }
