"""Disentanglement of units with respect to ground-truth factors: per-unit mutual information
(histogram and k-nearest-neighbour estimators), the mutual information gap (MIG), and a
per-unit monosemanticity score.

MIG (docs/metrics.md#mig): for each ground-truth factor v_k, I(z_j; v_k) for all units j, sorted;
MIG = mean_k (I_1 - I_2) / H(v_k). The histogram variant discretizes units into 20 bins; the
tag names the estimator (mig_hist20, mig_ksg).

Conventions:

- `codes_ND` are a layer's activations [N tokens, D units] (numpy or torch; float64 inside);
  a factor is an integer array [N] (`tti_dist.data.synthetic` factor columns), where a
  negative value means the factor is undefined at that token: such positions are left out
  of everything computed for that factor (its MI, its entropy, and the unit entropies that
  `monosemanticity` divides by). Factor values need not be contiguous.
- Information is in nats (natural logarithm), plug-in estimates with 0 log 0 = 0, exactly
  the formula of `tti_dist.metrics.routing.mutual_information` (Cover & Thomas eq. 2.28),
  vectorized over units here:

      I(z; v) = sum_{b,c: C_bc > 0} (C_bc / n) log(C_bc n / (r_b s_c)),
      H(v)    = sum_{c: s_c > 0} (s_c / n) log(n / s_c),

  C the contingency table of (binned unit, factor value), r/s its row/column sums.
  For a product table (unit independent of factor in the sample) every ratio is exactly 1,
  so I = 0 exactly. The histogram estimate is biased upward by about
  (B - 1)(K - 1) / (2n) nats for B occupied bins and K values (Miller 1955): ~0.002 nats for
  20 bins, 5 values, 16k tokens.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from scipy.special import digamma

from tti_dist.metrics.activation_stats import as_numpy

DEFAULT_NUM_BINS = 20
"""Bins per unit of the histogram estimator (docs/metrics.md#mig; disentanglement_lib default)."""

KSG_MAX_TOKENS = 5000
"""Default subsample size (defined positions per factor) of the k-nearest-neighbour estimator."""

KSG_NUM_NEIGHBORS = 3
"""k of the k-nearest-neighbour estimator (scikit-learn's default)."""

ESTIMATORS = ("histogram", "ksg")
"""Mutual-information estimators of `mig`."""

_CHUNK_ELEMENTS = 1 << 22
"""Elements (tokens x units) processed at once, bounding temporary memory (~32 MiB/array)."""


def _codes(codes_ND: Any, where: str) -> np.ndarray:
    c = as_numpy(codes_ND)
    if c.ndim != 2:
        raise ValueError(f"{where}: expected codes of shape [N, D], got shape {c.shape}")
    if c.dtype.kind not in "biuf":
        raise ValueError(f"{where}: codes must be numeric, got dtype {c.dtype}")
    if c.dtype.kind == "f" and not np.isfinite(c).all():
        raise ValueError(f"{where}: codes contain nan or inf")
    return c


def _factor(factor_N: Any, num: int, where: str) -> np.ndarray:
    f = as_numpy(factor_N).reshape(-1)
    if f.dtype.kind not in "iu":
        raise ValueError(f"{where}: factor labels must be integers, got dtype {f.dtype}")
    if f.shape[0] != num:
        raise ValueError(f"{where}: {num} code rows but {f.shape[0]} factor labels")
    return f.astype(np.int64)


def _unit_chunks(num_tokens: int, num_units: int):
    step = max(1, _CHUNK_ELEMENTS // max(num_tokens, 1))
    for start in range(0, num_units, step):
        yield slice(start, min(start + step, num_units))


def discretize(codes_ND: Any, num_bins: int = DEFAULT_NUM_BINS) -> np.ndarray:
    """int32 [N, D]: each unit binned into `num_bins` equal-width bins over its own
    [min, max] on the N tokens (all tokens, whether or not a factor is defined there):

        b_nd = min(floor(num_bins (z_nd - min_d) / (max_d - min_d)), num_bins - 1),

    so min_d falls in bin 0 and max_d in bin num_bins - 1. A constant unit (max_d = min_d,
    e.g. dead) is all bin 0. The equal-width histogram discretization of disentanglement_lib
    (Locatello et al. 2019, `_histogram_discretize`), used for MIG by Chen et al. 2018 and
    Locatello et al. Heavy-tailed units put most tokens into few bins; that is part of this
    variant's definition.
    """
    if num_bins < 1:
        raise ValueError(f"discretize: num_bins must be >= 1, got {num_bins}")
    c = _codes(codes_ND, "discretize")
    num, dim = c.shape
    out = np.zeros((num, dim), dtype=np.int32)
    if num == 0:
        return out
    for cols in _unit_chunks(num, dim):
        x = c[:, cols].astype(np.float64)
        lo, hi = x.min(axis=0), x.max(axis=0)
        span = hi - lo
        live = span > 0
        scaled = (x - lo) * (num_bins / np.where(live, span, 1.0))
        b = np.clip(np.floor(scaled), 0, num_bins - 1).astype(np.int32)
        b[:, ~live] = 0
        out[:, cols] = b
    return out


def _entropy_of_counts(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """H = sum_{c > 0} (c / n) log(n / c) along `axis` (n the sum along it); 0 where n = 0."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=axis, keepdims=True)
    safe_n = np.where(n > 0, n, 1.0)
    terms = np.where(counts > 0, counts * np.log(safe_n / np.where(counts > 0, counts, 1.0)), 0.0)
    return terms.sum(axis=axis) / np.squeeze(safe_n, axis=axis)


def factor_entropy(factor_N: Any) -> float:
    """Empirical entropy H(v) in nats of a factor over its defined (>= 0) positions:
    H(v) = sum_c (s_c / n) log(n / s_c), s_c the count of value c. 0 when none is defined."""
    f = as_numpy(factor_N).reshape(-1)
    f = f[f >= 0]
    if f.size == 0:
        return 0.0
    _, counts = np.unique(f, return_counts=True)
    return float(_entropy_of_counts(counts))


def _compact(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Nonnegative labels relabeled 0..K-1 (sorted order) and K."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), int(uniq.size)


def _histogram_terms(binned_ND: np.ndarray, factor_N: np.ndarray, num_bins: int) -> dict[str, Any]:
    """Plug-in I(z_j; v) [D], H(z_j) [D] and H(v), all over the positions where the factor is
    defined, from binned codes (values 0..num_bins-1) and int64 factor labels."""
    num_tokens, dim = binned_ND.shape
    keep = factor_N >= 0
    num_kept = int(np.count_nonzero(keep))
    if num_kept == 0:
        return {"mi": np.zeros(dim), "h_z": np.zeros(dim), "h_v": 0.0, "num_tokens": 0}
    values, num_values = _compact(factor_N[keep])
    binned = binned_ND[keep] if num_kept < num_tokens else binned_ND
    mi = np.empty(dim)
    h_z = np.empty(dim)
    cells = num_bins * num_values
    for cols in _unit_chunks(num_kept, dim):
        width = cols.stop - cols.start
        flat = binned[:, cols].astype(np.int64) * num_values + values[:, None]
        flat += (np.arange(width, dtype=np.int64) * cells)[None, :]
        c = np.bincount(flat.reshape(-1), minlength=width * cells).astype(np.float64)
        c = c.reshape(width, num_bins, num_values)
        r = c.sum(axis=2, keepdims=True)  # [w, B, 1] unit-bin counts
        s = c.sum(axis=1, keepdims=True)  # [w, 1, K] factor-value counts
        outer = r * s
        ratio = np.where(c > 0, c * num_kept / np.where(outer > 0, outer, 1.0), 1.0)
        mi[cols] = np.maximum((c * np.log(ratio)).sum(axis=(1, 2)) / num_kept, 0.0)
        h_z[cols] = _entropy_of_counts(r[:, :, 0], axis=1)
    h_v = float(_entropy_of_counts(np.bincount(values, minlength=num_values)))
    return {"mi": mi, "h_z": h_z, "h_v": h_v, "num_tokens": num_kept}


def mutual_information_matrix_histogram(codes_ND: Any, factor_N: Any, num_bins: int = DEFAULT_NUM_BINS) -> np.ndarray:
    """float64 [D]: I(z_j; v) in nats for every unit j and one factor v, the histogram
    estimator: each unit `discretize`d into `num_bins` equal-width bins (over all tokens),
    then the plug-in mutual information of the contingency table (binned z_j, v) over the
    positions where v is defined (formula in the module docstring; Chen et al. 2018,
    "Isolating Sources of Disentanglement in VAEs", histogram variant of Locatello et al.
    2019). All zeros when v is defined nowhere.
    """
    c = _codes(codes_ND, "mutual_information_matrix_histogram")
    f = _factor(factor_N, c.shape[0], "mutual_information_matrix_histogram")
    return _histogram_terms(discretize(c, num_bins), f, num_bins)["mi"]


def _kth_neighbor_distance_sorted(s_CN: np.ndarray, k: int) -> np.ndarray:
    """[C, n]: for rows sorted ascending (independent 1-D samples of n points), the distance
    from each point to its k-th nearest other point of the same row (ties counted as in a
    k-NN query that excludes the point itself). Requires 1 <= k <= n - 1.

    The k nearest others of point i are among its k left neighbours (distances
    L_1 <= ... <= L_k, L_j = s_i - s_{i-j}) and k right ones (R_j = s_{i+j} - s_i), missing
    ones at infinity; the k-th smallest of two sorted lists is
    min_{a=0..k} max(L_a, R_{k-a}) with L_0 = R_0 = -inf.
    """
    num_rows, num = s_CN.shape
    left, right = [], []
    for j in range(1, k + 1):
        gap = s_CN[:, j:] - s_CN[:, :-j]  # s[i + j] - s[i]
        pad = np.full((num_rows, j), np.inf)
        left.append(np.concatenate([pad, gap], axis=1))
        right.append(np.concatenate([gap, pad], axis=1))
    kth = np.minimum(left[k - 1], right[k - 1])  # a = k and a = 0
    for a in range(1, k):
        np.minimum(kth, np.maximum(left[a - 1], right[k - a - 1]), out=kth)
    return kth


def _count_closer(s_CN: np.ndarray, r_CN: np.ndarray) -> np.ndarray:
    """int64 [C, n]: for rows s (each sorted ascending) and radii r,
    m_ci = #{j : |s_cj - s_ci| < r_ci or s_cj = s_ci} (differences rounded as computed): the
    count of scikit-learn's KD-tree query with radius nextafter(r_ci, 0) (which compares
    squared distances: equal up to rounding at the boundary). A contiguous range
    of each row, found by binary search on s_ci -/+ r_ci (queries nearly sorted, so fast)
    and then corrected to the exact predicate (the sums s_ci +/- r_ci round)."""
    num_rows, num = s_CN.shape
    hi = np.empty(s_CN.shape, dtype=np.int64)
    lo = np.empty(s_CN.shape, dtype=np.int64)
    for c in range(num_rows):
        hi[c] = np.searchsorted(s_CN[c], s_CN[c] + r_CN[c], side="left")
        lo[c] = np.searchsorted(s_CN[c], s_CN[c] - r_CN[c], side="right")
    at = lambda idx: np.take_along_axis(s_CN, np.clip(idx, 0, num - 1), axis=1)  # noqa: E731
    for _ in range(num + 1):
        above, below = at(hi), at(hi - 1)
        grow = (hi < num) & ((above <= s_CN) | (above - s_CN < r_CN))
        shrink = (hi > 0) & (below > s_CN) & ~(below - s_CN < r_CN)
        lo_at, lo_before = at(lo), at(lo - 1)
        lo_up = (lo < num) & (lo_at < s_CN) & ~(s_CN - lo_at < r_CN)
        lo_down = (lo > 0) & ((lo_before >= s_CN) | (s_CN - lo_before < r_CN))
        if not (grow.any() or shrink.any() or lo_up.any() or lo_down.any()):
            break
        hi += grow.astype(np.int64) - shrink
        lo += lo_up.astype(np.int64) - lo_down
    return hi - lo


def _ross_mutual_information(x_CN: np.ndarray, labels: np.ndarray, num_neighbors: int) -> np.ndarray:
    """[C]: Ross (2014) k-NN estimate of I(x_c; label) for each row of x (float64 [C, n],
    units-major, already jittered) and labels 0..K-1 [n]; the algorithm of scikit-learn's
    `_compute_mi_cd`, vectorized over units:

        I = psi(n) + <psi(k_i)> - <psi(n_{y_i})> - <psi(m_i)>,   clipped at 0,

    k_i = min(k, n_{y_i} - 1), d_i the distance to the k_i-th nearest point with the same
    label, m_i the number of points (itself included) strictly closer than d_i (or equal to
    x_i when d_i = 0), averages over the points whose label occurs more than once (the others
    are dropped first)."""
    counts = np.bincount(labels)
    label_count = counts[labels]
    keep = label_count > 1
    x_CN, labels, label_count = x_CN[:, keep], labels[keep], label_count[keep]
    num_rows, num = x_CN.shape
    if num == 0:
        return np.zeros(num_rows)
    k_all = np.minimum(num_neighbors, label_count - 1)
    # Everything in each unit's sorted order (the means over points do not depend on it):
    # the points of one label, taken in that order, are that label's sorted sample.
    order = np.argsort(x_CN, axis=1)
    s = np.take_along_axis(x_CN, order, axis=1)
    labels_sorted = labels[order]
    radius = np.empty_like(s)
    for c in np.unique(labels):
        mask = labels_sorted == c
        size = int(counts[c])
        s_c = s[mask].reshape(num_rows, size)
        radius[mask] = _kth_neighbor_distance_sorted(s_c, min(num_neighbors, size - 1)).reshape(-1)
    m = _count_closer(s, radius)
    mi = digamma(num) + digamma(k_all).mean() - digamma(label_count).mean() - digamma(m).mean(axis=1)
    return np.maximum(mi, 0.0)


def _ksg_terms(codes: np.ndarray, factor: np.ndarray, max_tokens: int, seed: int,
               num_neighbors: int) -> dict[str, Any]:
    """k-NN I(z_j; v) [D] and H(v) over the same (subsampled) defined positions."""
    dim = codes.shape[1]
    idx = np.flatnonzero(factor >= 0)
    if idx.size > max_tokens:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_tokens, replace=False))
    if idx.size < 2:
        return {"mi": np.zeros(dim), "h_v": 0.0, "num_tokens": int(idx.size)}
    labels, num_values = _compact(factor[idx])
    h_v = float(_entropy_of_counts(np.bincount(labels, minlength=num_values)))
    # scikit-learn's preprocessing of continuous features (scale without centering, then
    # jitter of 1e-10 x max(1, mean |x|) from RandomState(seed)), so that results equal
    # mutual_info_classif(..., random_state=seed) on the same rows.
    x = codes[idx].astype(np.float64)
    std = x.std(axis=0)
    std[std < 10 * np.finfo(np.float64).eps] = 1.0
    x /= std
    scale = np.maximum(1.0, np.abs(x).mean(axis=0))
    x += 1e-10 * scale * np.random.RandomState(seed).standard_normal(size=x.shape)
    x_DN = np.ascontiguousarray(x.T)  # units-major: each unit's sample contiguous
    mi = np.empty(dim)
    for cols in _unit_chunks(x.shape[0] * 2 * num_neighbors, dim):
        mi[cols] = _ross_mutual_information(x_DN[cols], labels, num_neighbors)
    return {"mi": mi, "h_v": h_v, "num_tokens": int(idx.size)}


def mutual_information_matrix_ksg(codes_ND: Any, factor_N: Any, max_tokens: int = KSG_MAX_TOKENS, seed: int = 0,
                                  num_neighbors: int = KSG_NUM_NEIGHBORS) -> np.ndarray:
    """float64 [D]: I(z_j; v) in nats for every unit j and one factor v, the k-nearest-
    neighbour estimator for a continuous variable and a discrete one (Ross 2014, "Mutual
    Information between Discrete and Continuous Data Sets", PLoS ONE; after Kraskov,
    Stoegbauer & Grassberger 2004): the estimator of scikit-learn's `mutual_info_classif`
    (`discrete_features=False`, `n_neighbors=num_neighbors`, `random_state=seed`), whose
    preprocessing (scaling, 1e-10 jitter) and algorithm are reproduced here vectorized over
    units (scikit-learn loops over units with a KD-tree per unit and class: ~10 ms per unit;
    tests check agreement with it to 1e-9).

    Uses the positions where v is defined; if there are more than `max_tokens`, a random
    subset of `max_tokens` of them (numpy `default_rng(seed)`, without replacement). Cost
    ~O(max_tokens log(max_tokens) D). Codes with many tied values (the exact zeros of ReLU
    units) are separated only by the jitter: the estimator assumes continuous codes, so for
    sparse codes prefer the histogram estimator. Points whose factor value occurs once are
    dropped (as scikit-learn does). All zeros with fewer than 2 defined positions.
    """
    if max_tokens < 2:
        raise ValueError(f"mutual_information_matrix_ksg: max_tokens must be >= 2, got {max_tokens}")
    if num_neighbors < 1:
        raise ValueError(f"mutual_information_matrix_ksg: num_neighbors must be >= 1, got {num_neighbors}")
    c = _codes(codes_ND, "mutual_information_matrix_ksg")
    f = _factor(factor_N, c.shape[0], "mutual_information_matrix_ksg")
    return _ksg_terms(c, f, max_tokens, seed, num_neighbors)["mi"]


def mig(codes_ND: Any, factors: Mapping[str, Any], estimator: str = "histogram",
        num_bins: int = DEFAULT_NUM_BINS, max_tokens: int = KSG_MAX_TOKENS, seed: int = 0) -> dict[str, Any]:
    """Mutual information gap (Chen, Li, Grosse & Duvenaud 2018, "Isolating Sources of
    Disentanglement in Variational Autoencoders"; docs/metrics.md#mig):

        gap_k = (I_(1)(v_k) - I_(2)(v_k)) / H(v_k),     MIG = mean_k gap_k,

    I_(1) >= I_(2) the two largest of I(z_j; v_k) over units j, H(v_k) the empirical entropy
    of factor k over the positions used for its MI. 1 when each factor is captured by exactly
    one unit (and no other unit carries information about it), 0 when two units carry it
    equally.

    `estimator`: "histogram" (`mutual_information_matrix_histogram`, `num_bins` bins, all
    defined positions) or "ksg" (`mutual_information_matrix_ksg`, up to `max_tokens`
    defined positions per factor, `seed`). Factors with H(v_k) = 0 (fewer than 2 values, or
    undefined everywhere) are skipped, as are all factors when there are fewer than 2 units.

    The histogram estimate of I(z_j; v_k) never exceeds H(v_k), so gaps lie in [0, 1]; the
    k-NN estimate can exceed H(v_k) slightly (a gap like 1.001), and is not clipped.

    Width: I_(2) is the largest of D - 1 noisy estimates, which grows with D even when the
    other units carry nothing, so MIG falls with the number of units at a fixed signal. The
    histogram estimate's noise is small (its bias, the same for every unit, cancels in the
    gap): measured 0.1119 -> 0.1106 from D = 8 to 1024 (two informative units among D - 2
    independent Gaussian ones, N = 4096). The k-NN estimate's is not: 0.1118 -> 0.1057 ->
    0.1004 -> 0.0944 -> 0.0921 at D = 8, 32, 128, 512, 1024 (2048 tokens): compare "ksg"
    only at equal width.

    Returns `mig` (nan when every factor is skipped), `per_factor` {name: gap_k},
    `per_factor_unit` {name: argmax_j I(z_j; v_k)}, `skipped` [names], and `estimator`, the
    tag suffix naming the variant: "hist{num_bins}" (e.g. "hist20") or "ksg".
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"mig: estimator {estimator!r} is unknown; available: {', '.join(ESTIMATORS)}")
    c = _codes(codes_ND, "mig")
    dim = c.shape[1]
    binned = discretize(c, num_bins) if estimator == "histogram" else None
    per_factor: dict[str, float] = {}
    per_factor_unit: dict[str, int] = {}
    skipped: list[str] = []
    for name, values in factors.items():
        f = _factor(values, c.shape[0], f"mig(factor {name!r})")
        if dim < 2:
            skipped.append(name)
            continue
        if binned is not None:
            terms = _histogram_terms(binned, f, num_bins)
        else:
            terms = _ksg_terms(c, f, max_tokens, seed, KSG_NUM_NEIGHBORS)
        if not terms["h_v"] > 0:
            skipped.append(name)
            continue
        order = np.argsort(-terms["mi"], kind="stable")
        top, second = terms["mi"][order[0]], terms["mi"][order[1]]
        per_factor[name] = float((top - second) / terms["h_v"])
        per_factor_unit[name] = int(order[0])
    return {
        "mig": float(np.mean(list(per_factor.values()))) if per_factor else math.nan,
        "per_factor": per_factor,
        "per_factor_unit": per_factor_unit,
        "skipped": skipped,
        "estimator": f"hist{num_bins}" if estimator == "histogram" else "ksg",
    }


def monosemanticity(codes_ND: Any, factors: Mapping[str, Any], num_bins: int = DEFAULT_NUM_BINS,
                    threshold: float = 0.5) -> dict[str, Any]:
    """Per-unit monosemanticity: the share of a unit's (discretized) entropy explained by its
    best factor, Theil's uncertainty coefficient U(z | v) (Theil 1970; Press et al.,
    Numerical Recipes, section 14.7):

        score_j = max_k I(z_j; v_k) / H_k(z_j),

    z_j the unit `discretize`d into `num_bins` bins (over all tokens), I and H_k plug-in
    estimates over the positions where factor k is defined (each factor's ratio uses its own
    positions, so a factor defined on few tokens is judged on those tokens only; a unit
    constant on them has ratio 0 for that factor). A unit that is a deterministic function of
    one factor (e.g. a detector of one of its values) scores 1; a unit independent of all
    factors scores ~0 (plus the histogram bias, module docstring).

    Returns `per_unit_score` float64 [D] in [0, 1], `per_unit_factor` int64 [D] (index into
    `factor_names` of the best factor; -1 where the score is 0), `per_unit_live` bool [D],
    `factor_names`, `num_live_units`, and `share_above`: the share of live units with score
    > `threshold`. Units constant over all tokens (dead: H(z_j) = 0) score 0 and are excluded
    from `share_above` (nan when no unit is live); average scores over `per_unit_live` too,
    or the share of dead units (itself dependent on the number of tokens) pulls the mean down.

    Width and sample size: a per-unit score, so its mean and share over units do not grow
    with the number of units. Each ratio carries the histogram bias of I (module docstring)
    divided by H(z_j), larger for low-entropy (sparse) units and at small N: compare at equal
    N.
    """
    c = _codes(codes_ND, "monosemanticity")
    num, dim = c.shape
    binned = discretize(c, num_bins)
    live = (binned != binned[:1]).any(axis=0) if num else np.zeros(dim, dtype=bool)
    names = list(factors)
    ratios = np.zeros((len(names), dim))
    for i, name in enumerate(names):
        f = _factor(factors[name], num, f"monosemanticity(factor {name!r})")
        terms = _histogram_terms(binned, f, num_bins)
        h_z = terms["h_z"]
        ratios[i] = np.where(h_z > 0, terms["mi"] / np.where(h_z > 0, h_z, 1.0), 0.0)
    np.clip(ratios, 0.0, 1.0, out=ratios)
    ratios[:, ~live] = 0.0
    if names:
        score = ratios.max(axis=0)
        best = np.where(score > 0, ratios.argmax(axis=0), -1).astype(np.int64)
    else:
        score, best = np.zeros(dim), np.full(dim, -1, dtype=np.int64)
    num_live = int(np.count_nonzero(live))
    share = float(np.count_nonzero(score[live] > threshold)) / num_live if num_live else math.nan
    return {
        "per_unit_score": score,
        "per_unit_factor": best,
        "per_unit_live": live,
        "factor_names": names,
        "num_live_units": num_live,
        "share_above": share,
    }
