"""Supervised probes of activations for ground-truth factors: dense linear probes and
k-sparse probes on units chosen by a mean-difference ranking.

Definitions in docs/metrics.md#probes: per ground-truth factor, a logistic-regression probe evaluated on
a held-out split; k-sparse probes with k in {1, 2, 5} units chosen by mean-difference ranking.

Conventions (all functions):

- X_* are activations [N, D] (numpy or torch), y_* integer labels [N]; a negative label
  (the factor is undefined at that token, -1 in tti_dist.data.synthetic) removes the
  position from that split before anything else.
- Features are standardized with the mean and standard deviation of the (kept) train
  positions; a unit constant on the train split becomes 0 everywhere.
- The classifier is scikit-learn's `LogisticRegression` (lbfgs, L2 with C = 1, multinomial
  softmax when there are more than 2 classes: scikit-learn's only lbfgs mode since 1.7).
  It is fit with BLAS limited to `num_threads` threads (default 1: the problem is small, and
  multi-threaded OpenBLAS on a shared 2-core machine made a fit 15x slower).
- `chance` is the accuracy of always predicting the most frequent test class (its share of
  the test positions). A class present in the test split but absent from the train split
  can never be predicted, so its test positions count as wrong. With a single train class
  the probe predicts that class everywhere (no fit).
- Tokens of one document share their topic, so a token-level random split (below) lets a
  probe recognize documents; split by document when that matters.

Width and sample size: the dense probe has D x classes weights fitted on a fixed number of
tokens, so at a fixed signal its held-out accuracy falls as D grows (overfitting): measured
0.375, 0.364, 0.360, 0.320, 0.280 for D = 8, 32, 128, 512, 1024 (a 5-valued factor carried
by one unit among D - 1 independent Gaussian units, 2867 train tokens; chance 0.2).
Choosing C in {0.01, 0.1, 1} on a held-out quarter of the train split does not remove it
(three weakly informative units: 0.435 at D = 4, 0.291 with C = 1 and 0.293 with the chosen
C at D = 1024). The k-sparse probes fit k units at every width and did not drift (k = 1: 0.389 at every D;
k = 5: 0.372 to 0.389): compare those across widths, the dense probe within one width and
one eval size.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from tti_dist.metrics.activation_stats import as_numpy

SPARSE_PROBE_KS = (1, 2, 5)
"""Numbers of units of the k-sparse probes that `tti eval` reports (probe_k{1,2,5}_<factor>)."""

MEAN_DIFF_EPS = 1e-8
"""Added to the pooled standard deviation in the mean-difference score."""


def train_test_split_indices(num: int, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random split of range(num) into (train_idx, test_idx), both sorted int64:
    round(num * test_fraction) positions for test, the rest for train, chosen by a
    permutation from `numpy.random.default_rng(seed)` (same seed, same split)."""
    if num < 0:
        raise ValueError(f"train_test_split_indices: num must be >= 0, got {num}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"train_test_split_indices: test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(num)
    num_test = int(round(num * test_fraction))
    return np.sort(perm[num_test:]), np.sort(perm[:num_test])


def _defined(X: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) as numpy with the positions of negative labels removed."""
    x, lab = as_numpy(X), as_numpy(y).reshape(-1)
    if x.ndim != 2:
        raise ValueError(f"{where}: expected features of shape [N, D], got shape {x.shape}")
    if lab.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be integers, got dtype {lab.dtype}")
    if lab.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: {x.shape[0]} feature rows but {lab.shape[0]} labels")
    keep = lab >= 0
    return x[keep], lab[keep].astype(np.int64)


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both splits standardized with the train split's mean and std (std 0 -> 1)."""
    x_train = x_train.astype(np.float64)
    mean = x_train.mean(axis=0) if x_train.shape[0] else np.zeros(x_train.shape[1])
    std = x_train.std(axis=0) if x_train.shape[0] else np.ones(x_train.shape[1])
    std[std == 0] = 1.0
    return (x_train - mean) / std, (x_test.astype(np.float64) - mean) / std


def _fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   max_iter: int, num_threads: int | None) -> dict[str, Any]:
    """Accuracy of the logistic-regression probe on the (defined) test positions, with the
    chance level, class count and sizes (conventions in the module docstring)."""
    classes_test, counts_test = np.unique(y_test, return_counts=True)
    classes_train = np.unique(y_train)
    out: dict[str, Any] = {
        "accuracy": math.nan,
        "chance": float(counts_test.max() / y_test.size) if y_test.size else math.nan,
        "num_classes": int(np.union1d(classes_train, classes_test).size),
        "num_train": int(y_train.size),
        "num_test": int(y_test.size),
        "converged": True,
    }
    if y_test.size == 0 or y_train.size == 0:
        return out
    xs_train, xs_test = _standardize(x_train, x_test)
    if classes_train.size == 1:
        pred = np.full(y_test.shape, classes_train[0])
    else:
        clf = LogisticRegression(solver="lbfgs", C=1.0, max_iter=max_iter)
        with threadpool_limits(limits=num_threads), warnings.catch_warnings():
            # Non-convergence is reported in the result ("converged") instead.
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xs_train, y_train)
            pred = clf.predict(xs_test)
        out["converged"] = bool(np.max(clf.n_iter_) < max_iter)
    out["accuracy"] = float(np.mean(pred == y_test))
    return out


def linear_probe(X_train: Any, y_train: Any, X_test: Any, y_test: Any, max_iter: int = 200,
                 num_threads: int | None = 1) -> dict[str, Any]:
    """Dense linear probe for one factor: a logistic regression on all D standardized units,
    fit on the train split, accuracy on the test split (docs/metrics.md#probes; Alain & Bengio 2016,
    "Understanding intermediate layers using linear classifier probes"):

        p(y = c | x) = softmax_c(W x_std + b),   accuracy = mean_test [argmax_c p = y].

    Returns `accuracy`, `chance` (most frequent test class share), `num_classes` (distinct
    labels over both splits), `num_train`, `num_test` (after removing undefined positions)
    and `converged` (lbfgs stopped before `max_iter`). Conventions in the module docstring.
    """
    x_tr, y_tr = _defined(X_train, y_train, "linear_probe(train)")
    x_te, y_te = _defined(X_test, y_test, "linear_probe(test)")
    if x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(f"linear_probe: train has {x_tr.shape[1]} units, test {x_te.shape[1]}")
    return _fit_and_score(x_tr, y_tr, x_te, y_te, max_iter, num_threads)


def mean_difference_scores(X: Any, y: Any) -> np.ndarray:
    """float64 [D]: each unit's best one-vs-rest standardized mean difference,

        score_d = max_c |mean(x_d[y == c]) - mean(x_d[y != c])| / (s_pooled_dc + eps),
        s_pooled^2 = ((n_c - 1) var(x_d[y == c]) + (n_rest - 1) var(x_d[y != c])) / (n - 2),

    over the classes c present in y (negative labels removed; classes with n_c = n, i.e. a
    single class, contribute nothing, so the scores are all 0), unbiased variances,
    eps = MEAN_DIFF_EPS. The ranking of Gurnee et al. 2023 ("Finding Neurons in a Haystack:
    Case Studies with Sparse Probing") for choosing the units of k-sparse probes.
    """
    x, lab = _defined(X, y, "mean_difference_scores")
    num, dim = x.shape
    scores = np.zeros(dim)
    if num < 3:
        return scores
    xc = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)  # centered for stable sums
    total_sum, total_sq = xc.sum(axis=0), (xc * xc).sum(axis=0)
    for c in np.unique(lab):
        in_c = lab == c
        n_in = int(np.count_nonzero(in_c))
        n_out = num - n_in
        if n_in == 0 or n_out == 0:
            continue
        sum_in = xc[in_c].sum(axis=0)
        sq_in = (xc[in_c] ** 2).sum(axis=0)
        sum_out, sq_out = total_sum - sum_in, total_sq - sq_in
        mean_in, mean_out = sum_in / n_in, sum_out / n_out
        ss_in = np.maximum(sq_in - sum_in * mean_in, 0.0)  # (n_c - 1) var, centered
        ss_out = np.maximum(sq_out - sum_out * mean_out, 0.0)
        pooled = np.sqrt((ss_in + ss_out) / (num - 2))
        np.maximum(scores, np.abs(mean_in - mean_out) / (pooled + MEAN_DIFF_EPS), out=scores)
    return scores


def sparse_probe(X_train: Any, y_train: Any, X_test: Any, y_test: Any, k: int, max_iter: int = 200,
                 num_threads: int | None = 1) -> dict[str, Any]:
    """k-sparse probe for one factor (docs/metrics.md#probes; Gurnee et al. 2023, "Finding Neurons
    in a Haystack: Case Studies with Sparse Probing"): rank the units by
    `mean_difference_scores` on the train split, keep the top k (ties: lower unit index
    first), and fit the same logistic regression as `linear_probe` on those k units only.

    Returns `units` (the k unit indices, best first), `unit_scores` (their scores), and the
    keys of `linear_probe` (`accuracy`, `chance`, `num_classes`, ...). k must be in [1, D].
    """
    x_tr, y_tr = _defined(X_train, y_train, "sparse_probe(train)")
    x_te, y_te = _defined(X_test, y_test, "sparse_probe(test)")
    dim = x_tr.shape[1]
    if x_te.shape[1] != dim:
        raise ValueError(f"sparse_probe: train has {dim} units, test {x_te.shape[1]}")
    if not 1 <= k <= dim:
        raise ValueError(f"sparse_probe: k must be in [1, {dim}] (the number of units), got {k}")
    scores = mean_difference_scores(x_tr, y_tr)
    units = np.argsort(-scores, kind="stable")[:k]
    out = _fit_and_score(x_tr[:, units], y_tr, x_te[:, units], y_te, max_iter, num_threads)
    out["units"] = [int(u) for u in units]
    out["unit_scores"] = [float(scores[u]) for u in units]
    return out
