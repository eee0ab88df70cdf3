"""Interpretability metrics for `tti eval` (tti_dist.metrics.activation_stats, probes,
disentanglement) against hand-computed cases and closed forms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.feature_selection import mutual_info_classif

from tti_dist.eval.metrics import _unit_metrics
from tti_dist.metrics.activation_stats import (
    TC_NOISE_FLOOR,
    dead_and_dense,
    density_histogram,
    direction_cosines,
    gaussian_tc_bias,
    gaussian_tc_per_unit,
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


# ---------------------------------------------------------------- Gaussian TC per unit, bias-corrected


def _floored_tc(eigenvalues, eps: float) -> float:
    """TC of the correlation matrix (P + eps I) / (1 + eps) from the eigenvalues of P."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    return float(-0.5 * np.sum(np.log((lam + eps) / (1 + eps))))


def _block_units(num_tokens: int, num_units: int, block: int, rho: float, rng) -> np.ndarray:
    """Units in independent blocks of `block`, equicorrelated with rho inside a block."""
    shared = np.repeat(rng.standard_normal((num_tokens, num_units // block)), block, axis=1)
    return math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.standard_normal((num_tokens, num_units))


def _equicorrelated_eigenvalues(num_units: int, rho: float) -> list[float]:
    return [1 + (num_units - 1) * rho] + [1 - rho] * (num_units - 1)


def test_gaussian_tc_bias_closed_form():
    from scipy import integrate

    # D = 2: E[-1/2 log(1 - r^2)] under independence, r with density prop. to (1 - r^2)^((N-4)/2).
    for n in (5, 12, 100):
        dens = lambda r: (1 - r * r) ** ((n - 4) / 2)  # noqa: E731
        num = integrate.quad(lambda r: -0.5 * math.log1p(-r * r) * dens(r), -1, 1, limit=200)[0]
        assert gaussian_tc_bias(2, n) == pytest.approx(num / integrate.quad(dens, -1, 1)[0], rel=1e-7)
    assert gaussian_tc_bias(1, 10) == 0.0
    # ~D(D-1)/(4(N-1)) for D << N; the exact values quoted in the docs.
    assert gaussian_tc_bias(32, 40_001) == pytest.approx(32 * 31 / (4 * 40_000), rel=0.01)
    assert gaussian_tc_bias(256, 4096) == pytest.approx(4.0719, abs=1e-4)
    assert gaussian_tc_bias(1024, 4096) == pytest.approx(70.086, abs=1e-3)
    with pytest.raises(ValueError, match="num_units <= num_tokens - 1"):
        gaussian_tc_bias(10, 10)


def test_gaussian_tc_bias_is_the_plugin_bias_for_any_covariance():
    """Monte Carlo: the plug-in TC of D = 6 correlated Gaussian units from N = 12 tokens
    exceeds the true TC by b(6, 12) on average (the bias does not depend on the covariance)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    cov = a @ a.T + 0.5 * np.eye(6)
    true = 0.5 * (np.log(np.diag(cov)).sum() - np.linalg.slogdet(cov)[1])
    reps, n = 20_000, 12
    x = rng.standard_normal((reps, n, 6)) @ np.linalg.cholesky(cov).T
    x -= x.mean(axis=1, keepdims=True)
    s = np.einsum("rni,rnj->rij", x, x)
    d = np.sqrt(np.einsum("rii->ri", s))
    plugin = -0.5 * np.linalg.slogdet(s / d[:, :, None] / d[:, None, :])[1]
    excess, stderr = plugin.mean() - true, plugin.std() / math.sqrt(reps)
    b = gaussian_tc_bias(6, n)
    assert b == pytest.approx(0.93921, abs=1e-5)
    assert abs(excess - b) < 4 * stderr, (excess, b, stderr)
    assert abs(excess - 6 * 5 / (4 * (n - 1))) > 10 * stderr  # not the first-order D(D-1)/(4n), 0.68


def test_gaussian_tc_per_unit_independent_units_near_zero():
    """Independent units read ~0 per unit at any width (the plug-in reads its bias b(D, N))."""
    rng = np.random.default_rng(0)
    for dim in (256, 1024):
        x = rng.standard_normal((4096, dim)).astype(np.float32)
        out = gaussian_tc_per_unit(x)
        assert out["num_units_used"] == dim and out["num_live_units"] == dim and out["num_tokens"] == 4096
        assert abs(out["tc_per_unit"]) < 0.002  # requirement: < 0.05
        assert out["bias"] == pytest.approx(gaussian_tc_bias(dim, 4096))
        plugin = gaussian_total_correlation(x)["tc"]
        assert plugin == pytest.approx(gaussian_tc_bias(dim, 4096), rel=0.05)
    assert plugin / 1024 > 0.05  # the plug-in per unit fails the same test
    assert abs(gaussian_tc_per_unit(x, noise_floor=0.0)["tc_per_unit"]) < 0.002  # without the floor too
    # Sparse (ReLU-like, density ~2%) independent units: non-Gaussian, still ~0.
    sparse = np.maximum(rng.standard_normal((4096, 1024)) - 2.05, 0.0)
    out = gaussian_tc_per_unit(sparse)
    assert out["num_units_used"] == 1024 and abs(out["tc_per_unit"]) < 0.002


def test_gaussian_tc_per_unit_closed_forms():
    """Correlated units score the closed form of their Gaussian TC (per unit) within 5%;
    the plug-in does not."""
    rng = np.random.default_rng(1)
    eps = TC_NOISE_FLOOR
    # Blocks of 4 units with rho = 0.5 inside (eigenvalues 2.5, 0.5, 0.5, 0.5 per block).
    block = _equicorrelated_eigenvalues(4, 0.5)
    x = _block_units(4096, 1024, 4, 0.5, rng)
    exact = _floored_tc(block, 0.0) / 4
    assert exact == pytest.approx(0.145394, abs=1e-6)
    assert gaussian_tc_per_unit(x, noise_floor=0.0)["tc_per_unit"] == pytest.approx(exact, rel=0.05)
    assert gaussian_tc_per_unit(x)["tc_per_unit"] == pytest.approx(_floored_tc(block, eps) / 4, rel=0.05)
    assert gaussian_total_correlation(x)["tc"] / 1024 > 1.3 * exact  # plug-in: + b(1024, 4096) / 1024
    # One equicorrelated group of 256 units, rho = 0.3, N = 1024 (plug-in: +39%); mean of 4 draws.
    lam = _equicorrelated_eigenvalues(256, 0.3)
    values, floored, plugins = [], [], []
    for seed in range(4):
        x = _block_units(1024, 256, 256, 0.3, np.random.default_rng(10 + seed))
        values.append(gaussian_tc_per_unit(x, noise_floor=0.0)["tc_per_unit"])
        floored.append(gaussian_tc_per_unit(x, seed=seed)["tc_per_unit"])
        plugins.append(gaussian_total_correlation(x)["tc"] / 256)
    assert np.mean(values) == pytest.approx(_floored_tc(lam, 0.0) / 256, rel=0.05)
    assert np.mean(floored) == pytest.approx(_floored_tc(lam, eps) / 256, rel=0.05)
    assert np.mean(plugins) > 1.3 * _floored_tc(lam, 0.0) / 256
    # The floor changes a well-conditioned TC little (-1.2% here).
    assert _floored_tc(lam, eps) == pytest.approx(_floored_tc(lam, 0.0), rel=0.015)


def test_gaussian_tc_per_unit_linearly_dependent_units_are_finite_and_width_free():
    """4r units spanning an r-dimensional space (MLP pre-activations): infinite true TC,
    inf or rounding noise for the plug-in; with the noise floor the closed form of
    (P + eps I) / (1 + eps), the same per unit at two widths."""
    eps = TC_NOISE_FLOOR
    rng = np.random.default_rng(2)
    per_unit = {}
    for rank in (32, 128):
        w = rng.standard_normal((rank, 4 * rank))
        x = (rng.standard_normal((4096, rank)) @ w).astype(np.float32)
        cov = w.T @ w
        sd = np.sqrt(np.diag(cov))
        exact = _floored_tc(np.linalg.eigvalsh(cov / np.outer(sd, sd)), eps) / (4 * rank)
        out = gaussian_tc_per_unit(x)
        assert math.isfinite(out["tc_per_unit"]) and out["num_units_used"] == 4 * rank
        assert out["tc_per_unit"] == pytest.approx(exact, rel=0.05)
        assert out["tc_per_unit"] < 0.5 * math.log((1 + eps) / eps)  # the cap of a null direction
        per_unit[rank] = out["tc_per_unit"]
    assert per_unit[32] == pytest.approx(per_unit[128], rel=0.03)
    assert not gaussian_total_correlation(x)["tc"] / (4 * rank) < 3.0  # plug-in: inf or >= 12 nats/unit


def test_gaussian_tc_per_unit_finite_with_fewer_tokens_than_units():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 512))
    assert not gaussian_total_correlation(x)["tc"] < 1000  # the plug-in: inf, or rounding noise
    out = gaussian_tc_per_unit(x)
    assert out["num_units_used"] == 255 and out["num_live_units"] == 512
    assert math.isfinite(out["tc_per_unit"]) and abs(out["tc_per_unit"]) < 0.05
    # A subset of 255 of 512 units in blocks of 4 (rho = 0.5): a lower bound of the layer's
    # per-unit TC (Han 1978); a random subset keeps few whole blocks, so well below it.
    blocks = _block_units(256, 512, 4, 0.5, rng)
    out = gaussian_tc_per_unit(blocks)
    assert out["num_units_used"] == 255
    assert 0.02 < out["tc_per_unit"] < _floored_tc(_equicorrelated_eigenvalues(4, 0.5), TC_NOISE_FLOOR) / 4
    assert gaussian_tc_per_unit(blocks) == out  # seeded: the same subset and noise


def test_gaussian_tc_per_unit_dead_units_do_not_move_it():
    rng = np.random.default_rng(4)
    x = _block_units(2048, 64, 4, 0.5, rng)
    base = gaussian_tc_per_unit(x)
    dead = np.concatenate([x, np.zeros((2048, 20)), np.full((2048, 5), 3.0)], axis=1)
    assert gaussian_tc_per_unit(dead) == {**base}  # appended: bit-identical
    # Interleaved: live units are the same, each with its own noise (by unit index).
    mixed = np.zeros((2048, 96))
    live = np.sort(rng.choice(96, size=64, replace=False))
    mixed[:, live] = x
    mixed[:, np.setdiff1d(np.arange(96), live)[0]] = 1.5  # a constant unit, not 0
    got = gaussian_tc_per_unit(mixed)
    assert got["num_units_used"] == 64 and got["num_live_units"] == 64
    assert got["tc_per_unit"] == pytest.approx(base["tc_per_unit"], abs=0.003)
    assert gaussian_tc_per_unit(mixed, noise_floor=0.0)["tc_per_unit"] == pytest.approx(
        gaussian_tc_per_unit(x, noise_floor=0.0)["tc_per_unit"], rel=1e-9)
    # Degenerate inputs.
    assert math.isnan(gaussian_tc_per_unit(np.ones((1, 4)))["tc_per_unit"])
    one = gaussian_tc_per_unit(np.stack([x[:, 0], np.zeros(2048)], axis=1))
    assert one["tc_per_unit"] == 0.0 and one["num_units_used"] == 1
    with pytest.raises(ValueError, match="noise_floor"):
        gaussian_tc_per_unit(x, noise_floor=-0.1)


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
    # cos^2: 1/2, 0, 1/2 -> mean 1/3 over the 6 ordered pairs; x D = 2.
    assert out["mean_sq_cos"] == pytest.approx(1 / 3)
    assert out["mean_sq_cos_rel"] == pytest.approx(2 / 3)
    assert math.isnan(direction_cosines(np.ones((1, 3)))["mean_abs_cos"])
    assert math.isnan(direction_cosines(np.ones((1, 3)))["mean_sq_cos_rel"])
    assert direction_cosines(q[:4])["mean_sq_cos_rel"] == pytest.approx(0.0, abs=1e-12)


def test_direction_cosines_width_normalised():
    """mean_sq_cos_rel = D mean cos^2: 1 for random directions at any D, (K - D)/(K - 1) for a
    tight frame (Welch's bound); mean_abs_cos of random directions falls as sqrt(2/(pi D))."""
    # Two orthonormal bases of R^4 (identity, Hadamard / 2): |cos| = 1/2 across, 0 within.
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0
    out = direction_cosines(np.concatenate([np.eye(4), hadamard]))
    assert out["mean_sq_cos_rel"] == pytest.approx((8 - 4) / (8 - 1), rel=1e-12)
    assert out["mean_abs_cos"] == pytest.approx(32 * 0.5 / 56, rel=1e-12)
    rng = np.random.default_rng(0)
    for dim in (32, 256):
        out = direction_cosines(rng.standard_normal((4 * dim, dim)))
        e_abs = math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)  # E|cos|
        assert out["mean_abs_cos"] == pytest.approx(e_abs, rel=0.02)
        assert out["mean_sq_cos_rel"] == pytest.approx(1.0, abs=0.03)


def test_direction_cosines_chunked_matches_dense():
    w = np.random.default_rng(1).standard_normal((1500, 8))  # more rows than one Gram chunk
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    g = np.abs(wn @ wn.T)
    np.fill_diagonal(g, 0.0)
    out = direction_cosines(w)
    assert out["mean_abs_cos"] == pytest.approx(g.sum() / (1500 * 1499), rel=1e-10)
    assert out["max_abs_cos"] == pytest.approx(g.max(), rel=1e-12)
    assert out["mean_max_abs_cos"] == pytest.approx(g.max(axis=1).mean(), rel=1e-10)
    assert out["mean_sq_cos_rel"] == pytest.approx(8 * (g**2).sum() / (1500 * 1499), rel=1e-10)


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


def test_mig_hist20_does_not_drift_with_width():
    """Two informative units among D - 2 independent ones: the histogram MIG is the same
    at D = 8 and D = 256 (the second-best unit's histogram noise is small, and its bias,
    common to all units, cancels in the gap)."""
    rng = np.random.default_rng(0)
    n = 4096
    f = {"a": rng.integers(0, 5, n), "b": rng.integers(0, 3, n)}
    signal = np.stack([0.6 * f["a"] + rng.standard_normal(n), 0.8 * (f["b"] == 1) + rng.standard_normal(n)], axis=1)
    noise = rng.standard_normal((n, 254))
    narrow = mig(np.concatenate([signal, noise[:, :6]], axis=1), f)
    wide = mig(np.concatenate([signal, noise], axis=1), f)
    assert narrow["per_factor_unit"] == wide["per_factor_unit"] == {"a": 0, "b": 1}
    assert narrow["mig"] > 0.05
    assert wide["mig"] == pytest.approx(narrow["mig"], abs=0.003)


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
    assert out["per_unit_live"].tolist() == [True, True, False, True]
    assert out["share_above"] == pytest.approx(2 / 3)  # the dead unit is not counted
    # tti eval's mono_mean averages over the live units, as documented (not over all 4).
    got = _unit_metrics("p/", codes, {"a": a, "b": b})
    assert got["p/mono_mean"] == pytest.approx((2.0 + score[1]) / 3, abs=1e-12)
    assert got["p/mono_share"] == pytest.approx(2 / 3)


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
