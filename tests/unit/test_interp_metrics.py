"""Interpretability metrics for `tti eval` (tti_dist.metrics.activation_stats, probes,
disentanglement) against hand-computed cases and closed forms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.feature_selection import mutual_info_classif

from tti_dist.metrics.activation_stats import (
    dead_and_dense,
    density_histogram,
    direction_cosines,
    gaussian_total_correlation,
    l0,
    unit_density,
)
from tti_dist.metrics.disentanglement import (
    discretize,
    factor_entropy,
    mig,
    monosemanticity,
    mutual_information_matrix_histogram,
    mutual_information_matrix_ksg,
)
from tti_dist.metrics.probes import (
    linear_probe,
    mean_difference_scores,
    sparse_probe,
    train_test_split_indices,
)
from tti_dist.metrics.routing import mutual_information


def _product_design(sizes: tuple[int, ...], repeats: int) -> dict[str, np.ndarray]:
    """Factors named a, b, c, ... taking every combination of values equally often."""
    combos = np.array(list(itertools.product(*(range(s) for s in sizes))), dtype=np.int64)
    combos = np.repeat(combos, repeats, axis=0)
    return {chr(ord("a") + i): combos[:, i] for i in range(len(sizes))}


# ---------------------------------------------------------------- activation statistics


def test_l0_density_dead_dense_on_hand_matrix():
    acts = np.array(
        [[0, 1, 0, 2, 0.0],
         [0, 0, 0, 3, 0.0],
         [0, 5, 0, 0, 0.0],
         [0, 0, 0, 4, 0.5]], dtype=np.float32)
    assert l0(acts) == 1.5  # 2, 1, 1, 2 nonzero
    assert l0(torch.from_numpy(acts).to(torch.bfloat16)) == 1.5
    density = unit_density(acts)
    np.testing.assert_array_equal(density, [0.0, 0.5, 0.0, 0.75, 0.25])
    assert density.mean() * acts.shape[1] == pytest.approx(l0(acts))
    stats = dead_and_dense(density)
    assert stats == {"dead_frac": 0.4, "dense_1pct_frac": 0.6, "dense_10pct_frac": 0.6, "num_units": 5}
    # The two dense thresholds are strict: 0.01 and 0.1 themselves are not dense.
    stats = dead_and_dense(np.array([0.0, 0.005, 0.01, 0.05, 0.1, 0.5]))
    assert stats["dead_frac"] == pytest.approx(1 / 6)
    assert stats["dense_1pct_frac"] == pytest.approx(3 / 6)
    assert stats["dense_10pct_frac"] == pytest.approx(1 / 6)
    assert math.isnan(l0(np.zeros((0, 3))))


def test_density_histogram_bins():
    counts, edges = density_histogram(np.array([0.0, 0.0, 1e-7, 1e-3, 0.5, 1.0]), num_bins=6, min_log10=-6.0)
    np.testing.assert_allclose(edges, [-7, -6, -5, -4, -3, -2, -1, 0])
    # dead: 2; 1e-7 is below the range -> first live bin; 1e-3 -> [-3, -2); 0.5 and 1 -> [-1, 0].
    np.testing.assert_array_equal(counts, [2, 1, 0, 0, 1, 0, 2])
    assert counts.sum() == 6


def _with_exact_covariance(cov: np.ndarray, num: int, seed: int) -> np.ndarray:
    """Samples [num, D] whose sample covariance (ddof 1) is `cov` up to rounding."""
    x = np.random.default_rng(seed).standard_normal((num, cov.shape[0]))
    x -= x.mean(axis=0)
    white = x @ np.linalg.inv(np.linalg.cholesky(x.T @ x / (num - 1))).T
    return white @ np.linalg.cholesky(cov).T + 3.0


def test_gaussian_tc_closed_form():
    rho = 0.6
    x = _with_exact_covariance(np.array([[1.0, rho], [rho, 1.0]]), 500, seed=0)
    out = gaussian_total_correlation(x)
    assert out["num_units_used"] == 2
    assert out["tc"] == pytest.approx(-0.5 * math.log(1 - rho**2), abs=1e-10)
    # Scaling units does not change it; a constant (dead) unit is left out.
    scaled = np.concatenate([x * np.array([5.0, 0.1]), np.full((500, 1), 2.0)], axis=1)
    out = gaussian_total_correlation(scaled)
    assert out["num_units_used"] == 2
    assert out["tc"] == pytest.approx(-0.5 * math.log(1 - rho**2), abs=1e-10)
    # Exactly uncorrelated (diagonal covariance, unequal variances): TC = 0.
    indep = _with_exact_covariance(np.diag([1.0, 4.0, 0.25]), 400, seed=1)
    assert gaussian_total_correlation(indep)["tc"] == pytest.approx(0.0, abs=1e-10)
    # 3 units: 1/2 (sum log S_dd - log det S) directly.
    cov = np.array([[2.0, 0.5, 0.3], [0.5, 1.0, -0.4], [0.3, -0.4, 1.5]])
    expected = 0.5 * (np.log(np.diag(cov)).sum() - np.linalg.slogdet(cov)[1])
    out = gaussian_total_correlation(_with_exact_covariance(cov, 300, seed=2).astype(np.float32))
    assert out["tc"] == pytest.approx(expected, rel=1e-4)
    # Duplicate units: singular covariance -> inf; one live unit -> 0.
    assert gaussian_total_correlation(np.repeat(x[:, :1], 2, axis=1))["tc"] == math.inf
    assert gaussian_total_correlation(np.stack([x[:, 0], np.zeros(500)], axis=1)) == {"tc": 0.0, "num_units_used": 1}


def test_direction_cosines():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
    out = direction_cosines(q[:4])  # 4 orthonormal rows in 6 dims
    assert out["mean_abs_cos"] == pytest.approx(0.0, abs=1e-12)
    assert out["max_abs_cos"] == pytest.approx(0.0, abs=1e-12)
    assert out["num_rows_used"] == 4
    same = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    assert direction_cosines(same)["max_abs_cos"] == pytest.approx(1.0)
    # Hand-computed: |cos| = 1/sqrt2 (rows 0-1), 0 (0-2), 1/sqrt2 (1-2); the zero row is ignored.
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0], [0.0, 0.0]])
    out = direction_cosines(w)
    s = 1 / math.sqrt(2)
    assert out["num_rows_used"] == 3
    assert out["mean_abs_cos"] == pytest.approx(2 * s / 3)
    assert out["max_abs_cos"] == pytest.approx(s)
    assert out["mean_max_abs_cos"] == pytest.approx(s)
    assert math.isnan(direction_cosines(np.ones((1, 3)))["mean_abs_cos"])


def test_direction_cosines_chunked_matches_dense():
    w = np.random.default_rng(1).standard_normal((1500, 8))  # more rows than one Gram chunk
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    g = np.abs(wn @ wn.T)
    np.fill_diagonal(g, 0.0)
    out = direction_cosines(w)
    assert out["mean_abs_cos"] == pytest.approx(g.sum() / (1500 * 1499), rel=1e-10)
    assert out["max_abs_cos"] == pytest.approx(g.max(), rel=1e-12)
    assert out["mean_max_abs_cos"] == pytest.approx(g.max(axis=1).mean(), rel=1e-10)


# ---------------------------------------------------------------- mutual information, MIG


def test_discretize_equal_width():
    codes = np.array([[0.0, 5.0, -1.0], [0.49, 5.0, 1.0], [0.5, 5.0, 0.0], [1.0, 5.0, 3.0]])
    np.testing.assert_array_equal(discretize(codes, num_bins=2), [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1]])
    b = discretize(codes, num_bins=4)
    assert b[:, 0].tolist() == [0, 1, 2, 3] and b[:, 1].tolist() == [0, 0, 0, 0] and b[:, 2].tolist() == [0, 2, 1, 3]


def test_mutual_information_histogram_hand_table():
    # Unit in {0, 1} (2 bins: value -> bin); factor in {3, 7} (non-contiguous values). Table
    # [[3, 1], [1, 3]]; two extra positions with factor -1 are left out.
    z = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1], dtype=np.float32)
    v = np.array([3, 3, 3, 7, 7, 7, 7, 3, -1, -1])
    noise = np.array([0.1, 0.9, 0.4, 0.3, 0.2, 0.8, 0.6, 0.7, 0.5, 0.0])
    mi = mutual_information_matrix_histogram(np.stack([z, noise], axis=1), v, num_bins=2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert mi[0] == pytest.approx(expected, abs=1e-12)
    assert mi[0] == pytest.approx(mutual_information(torch.tensor([[3.0, 1.0], [1.0, 3.0]])), abs=1e-12)
    # noise binned: [0, 1, 0, 0, 0, 1, 1, 1] over the 8 defined positions -> table [[2, 2], [2, 2]].
    assert mi[1] == 0.0
    assert factor_entropy(v) == pytest.approx(math.log(2))


def test_mig_copy_code_is_one_and_duplicate_is_zero():
    f = _product_design((3, 4, 2), repeats=5)
    codes = np.stack([f["a"], f["b"], f["c"]], axis=1).astype(np.float32)
    out = mig(codes, f)
    assert out["estimator"] == "hist20"
    assert out["mig"] == pytest.approx(1.0, abs=1e-12)
    assert out["per_factor"] == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0}, abs=1e-12)
    assert out["per_factor_unit"] == {"a": 0, "b": 1, "c": 2}
    assert out["skipped"] == []
    # Factor a copied into two units: no gap for a; b still has its own unit.
    dup = np.stack([f["a"], f["a"] * 2.0 + 1.0, f["b"]], axis=1)
    out = mig(dup, {"a": f["a"], "b": f["b"]})
    assert out["per_factor"]["a"] == pytest.approx(0.0, abs=1e-12)
    assert out["per_factor"]["b"] == pytest.approx(1.0, abs=1e-12)
    assert out["mig"] == pytest.approx(0.5, abs=1e-12)
    # Constant or undefined factors are skipped; one unit: everything skipped.
    out = mig(codes, {"a": f["a"], "const": np.zeros_like(f["a"]), "none": np.full_like(f["a"], -1)})
    assert out["skipped"] == ["const", "none"] and out["mig"] == pytest.approx(1.0)
    out = mig(codes[:, :1], {"a": f["a"]})
    assert out["skipped"] == ["a"] and math.isnan(out["mig"])
    with pytest.raises(ValueError, match="estimator"):
        mig(codes, f, estimator="kde")


def test_mig_undefined_positions_excluded():
    f = _product_design((3, 2), repeats=4)
    a = f["a"].copy()
    a[::4] = -1  # one of each (a, b) combination: the defined positions stay balanced
    # The unit copies a where a is defined and holds an outlier elsewhere.
    unit = np.where(a >= 0, a, 17.0)
    codes = np.stack([unit, f["b"]], axis=1)
    out = mig(codes, {"a": a, "b": f["b"]}, num_bins=20)
    assert out["per_factor"]["a"] == pytest.approx(1.0, abs=1e-12)


def test_ksg_matches_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    x = rng.standard_normal((300, 5))
    x[:, 0] += y
    x[:, 2] = np.maximum(x[:, 2], 0.0)  # ties at 0, separated by the jitter only
    x[:, 3] = 1.5  # constant
    x[:, 4] = np.round(x[:, 4])  # few distinct values
    ours = mutual_information_matrix_ksg(x, y, seed=7)
    ref = mutual_info_classif(x, y, discrete_features=False, random_state=7)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    assert ours[0] > 0.3
    # Subsampled estimate: deterministic in the seed.
    a = mutual_information_matrix_ksg(x, y, max_tokens=100, seed=1)
    np.testing.assert_array_equal(a, mutual_information_matrix_ksg(x, y, max_tokens=100, seed=1))


def test_mig_ksg_noisy_copy_code():
    f = _product_design((3, 4, 2), repeats=40)
    rng = np.random.default_rng(0)
    codes = np.stack([f["a"], f["b"], f["c"]], axis=1) + 0.05 * rng.standard_normal((f["a"].size, 3))
    codes = np.concatenate([codes, rng.standard_normal((f["a"].size, 3))], axis=1)  # 3 noise units
    out = mig(codes, f, estimator="ksg")
    assert out["estimator"] == "ksg"
    assert out["mig"] > 0.8
    assert out["per_factor_unit"] == {"a": 0, "b": 1, "c": 2}


def test_monosemanticity():
    f = _product_design((4, 3), repeats=400)  # 4800 tokens
    a, b = f["a"], f["b"]
    rng = np.random.default_rng(0)
    codes = np.stack([
        b.astype(np.float64),  # copy of b
        rng.standard_normal(a.size),  # noise
        np.zeros(a.size),  # dead
        (a == 2).astype(np.float64),  # detector of one value of a
    ], axis=1)
    out = monosemanticity(codes, {"a": a, "b": b}, threshold=0.5)
    score = out["per_unit_score"]
    assert score[0] == pytest.approx(1.0, abs=1e-12)
    assert score[1] < 0.02
    assert score[2] == 0.0
    assert score[3] == pytest.approx(1.0, abs=1e-12)
    assert out["factor_names"] == ["a", "b"]
    assert out["per_unit_factor"][[0, 2, 3]].tolist() == [1, -1, 0]
    assert out["num_live_units"] == 3
    assert out["share_above"] == pytest.approx(2 / 3)  # the dead unit is not counted


def test_monosemanticity_uses_defined_positions():
    f = _product_design((3,), repeats=50)
    v = f["a"].copy()
    v[:30] = -1
    unit = np.where(v >= 0, v, 9.0).astype(np.float64)  # a copy of v where v is defined
    out = monosemanticity(unit[:, None], {"v": v})
    assert out["per_unit_score"][0] == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- probes


def test_train_test_split_indices():
    train, test = train_test_split_indices(100, test_fraction=0.3, seed=3)
    assert test.size == 30 and train.size == 70
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert np.array_equal(test, train_test_split_indices(100, 0.3, seed=3)[1])
    assert not np.array_equal(test, train_test_split_indices(100, 0.3, seed=4)[1])


def test_linear_probe_separable_and_random():
    rng = np.random.default_rng(0)
    n = 1500
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 6))
    x[:, 2] = 3.0 * y + 0.1 * rng.standard_normal(n)
    train, test = train_test_split_indices(n, seed=0)
    out = linear_probe(x[train], y[train], x[test], y[test])
    assert out["accuracy"] > 0.99
    assert out["num_classes"] == 3 and out["num_test"] == 450
    # Labels independent of the code: accuracy within a few points of chance.
    y4 = rng.integers(0, 4, 2000)
    noise = rng.standard_normal((2000, 10)).astype(np.float32)
    train, test = train_test_split_indices(2000, seed=1)
    out = linear_probe(torch.from_numpy(noise[train]), y4[train], noise[test], y4[test])
    assert 0.2 < out["chance"] < 0.32
    assert abs(out["accuracy"] - out["chance"]) < 0.06


def test_linear_probe_undefined_and_unseen_classes():
    rng = np.random.default_rng(1)
    y_tr = np.repeat([0, 1, -1], 100)  # -1: undefined, dropped
    x_tr = (y_tr * 4.0)[:, None] + 0.1 * rng.standard_normal((300, 1))
    y_te = np.repeat([0, 1, 2, -1], 25)  # class 2 never seen in training: counted wrong
    x_te = (np.where(y_te == 2, 8, y_te) * 4.0)[:, None]
    out = linear_probe(x_tr, y_tr, x_te, y_te)
    assert out["num_train"] == 200 and out["num_test"] == 75 and out["num_classes"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["chance"] == pytest.approx(1 / 3)


def test_mean_difference_scores_hand_case():
    x = np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    y = np.array([0, 0, 1, 1])
    # Means 0.5 vs 2.5; unbiased within-group variances 0.5 -> pooled std sqrt(0.5).
    np.testing.assert_allclose(mean_difference_scores(x, y), [2.0 / math.sqrt(0.5), 0.0], rtol=1e-7)


def test_sparse_probe_picks_informative_unit():
    rng = np.random.default_rng(2)
    n, d = 1200, 30
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, d))
    x[:, 17] += 2.5 * y
    train, test = train_test_split_indices(n, seed=2)
    out = sparse_probe(x[train], y[train], x[test], y[test], k=1)
    assert out["units"] == [17]
    assert out["accuracy"] > 0.7
    out2 = sparse_probe(x[train], y[train], x[test], y[test], k=2)
    assert out2["units"][0] == 17 and len(out2["units"]) == 2
    with pytest.raises(ValueError, match="k must be"):
        sparse_probe(x[train], y[train], x[test], y[test], k=0)
