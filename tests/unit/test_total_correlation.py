"""Total correlation estimators (tti_dist.metrics.total_correlation) against closed forms and a
naive loop, and the config validation of the `kl` and `total_correlation` regularizers."""

from __future__ import annotations

import math

import pytest
import torch

from tti_dist.metrics.total_correlation import (
    gaussian_log_density,
    gaussian_total_correlation,
    log_importance_weights,
    total_correlation,
)

F64 = torch.float64


def _estimate(mu, logvar, z, dataset_size, estimator="mss"):
    log_q = gaussian_log_density(z[:, None, :], mu[None], logvar[None])
    log_w = log_importance_weights(mu.shape[0], dataset_size, estimator, dtype=log_q.dtype)
    return total_correlation(log_q, log_w).mean().item()


# ---------------------------------------------------------------- importance weights

@pytest.mark.parametrize("m, n", [(2, 2), (3, 7), (16, 16), (50, 1000), (300, 10**9)])
def test_mss_rows_sum_to_one(m, n):
    w = log_importance_weights(m, n, "mss", dtype=F64)
    assert w.shape == (m, m)
    torch.testing.assert_close(torch.logsumexp(w, dim=1), torch.zeros(m, dtype=F64), rtol=0, atol=1e-12)
    # Own sample 1/N on the diagonal, every other sample (N-1)/(N(M-1)).
    torch.testing.assert_close(torch.diagonal(w), torch.full((m,), -math.log(n), dtype=F64), rtol=0, atol=1e-12)
    off = w[~torch.eye(m, dtype=torch.bool)]
    expected = math.log((n - 1) / (n * (m - 1)))
    torch.testing.assert_close(off, torch.full_like(off, expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("m, n, offset, rows", [(8, 100, 0, 4), (8, 100, 4, 4), (9, 5, 3, 2), (6, 6, 5, 1)])
def test_mss_row_slices_are_slices_of_the_full_matrix(m, n, offset, rows):
    full = log_importance_weights(m, n, "mss", dtype=F64)
    part = log_importance_weights(m, n, "mss", row_offset=offset, num_rows=rows, dtype=F64)
    assert torch.equal(part, full[offset:offset + rows])
    torch.testing.assert_close(torch.logsumexp(part, dim=1), torch.zeros(rows, dtype=F64), rtol=0, atol=1e-12)


def test_mss_with_dataset_equal_to_batch_is_uniform():
    w = log_importance_weights(5, 5, "mss", dtype=F64)
    torch.testing.assert_close(w, torch.full((5, 5), -math.log(5), dtype=F64), rtol=0, atol=1e-14)


def test_mws_weights_are_one_over_m_n():
    w = log_importance_weights(6, 40, "mws", row_offset=2, num_rows=3, dtype=F64)
    assert w.shape == (3, 6)
    torch.testing.assert_close(w, torch.full((3, 6), -math.log(240), dtype=F64), rtol=0, atol=1e-14)
    # Rows sum to 1/N, not 1 (Chen et al.'s formula: log(M N) subtracted in every logsumexp).
    torch.testing.assert_close(torch.logsumexp(w, 1), torch.full((3,), -math.log(40), dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [
    dict(num_samples=4, dataset_size=10, estimator="mxs"),
    dict(num_samples=4, dataset_size=1, estimator="mss"),
    dict(num_samples=1, dataset_size=10, estimator="mss"),
    dict(num_samples=4, dataset_size=10, estimator="mss", row_offset=3, num_rows=2),
])
def test_bad_weight_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        log_importance_weights(**kwargs)


# ---------------------------------------------------------------- estimator

def test_gaussian_log_density_matches_torch_normal():
    g = torch.Generator().manual_seed(0)
    z, mu, lv = (torch.randn(5, 3, generator=g, dtype=F64) for _ in range(3))
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * lv)).log_prob(z)
    torch.testing.assert_close(gaussian_log_density(z, mu, lv), ref, rtol=1e-12, atol=1e-12)


def test_total_correlation_equals_naive_loop():
    g = torch.Generator().manual_seed(3)
    rows, m, d = 3, 5, 4
    log_q = torch.randn(rows, m, d, generator=g, dtype=F64) * 2 - 3
    log_w = torch.randn(rows, m, generator=g, dtype=F64) - 2
    got = total_correlation(log_q, log_w)
    for i in range(rows):
        joint = math.log(sum(math.exp(sum(log_q[i, j, k].item() for k in range(d)) + log_w[i, j].item())
                             for j in range(m)))
        marginals = sum(math.log(sum(math.exp(log_q[i, j, k].item() + log_w[i, j].item()) for j in range(m)))
                        for k in range(d))
        assert got[i].item() == pytest.approx(joint - marginals, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_posterior_independent_of_x_gives_zero_mss_and_offset_mws(d):
    """q(z|x) = N(0, I) for every x: z carries no information and q(z) = N(0, I), TC = 0.
    Every row-normalised weighting (mss) gives exactly 0; mws reads (D - 1) log N."""
    m, n = 64, 50_000
    g = torch.Generator().manual_seed(1)
    z = torch.randn(m, d, generator=g, dtype=F64)
    mu = torch.zeros(m, d, dtype=F64)
    lv = torch.zeros(m, d, dtype=F64)
    assert abs(_estimate(mu, lv, z, n, "mss")) < 1e-5
    assert _estimate(mu, lv, z, n, "mws") == pytest.approx((d - 1) * math.log(n), abs=1e-5)


def test_mws_is_uniform_estimate_plus_constant():
    """For any posteriors: mws = (weights 1/M) estimate + (D - 1) log N, so same gradients."""
    g = torch.Generator().manual_seed(2)
    m, d, n = 40, 3, 1000
    mu = torch.randn(m, d, generator=g, dtype=F64)
    lv = torch.randn(m, d, generator=g, dtype=F64) * 0.3 - 1
    z = mu + torch.exp(0.5 * lv) * torch.randn(m, d, generator=g, dtype=F64)
    uniform = _estimate(mu, lv, z, m, "mss")  # N = M: mss weights are exactly 1/M
    assert _estimate(mu, lv, z, n, "mws") == pytest.approx(uniform + (d - 1) * math.log(n), abs=1e-9)
    assert _estimate(mu, lv, z, n, "mss") != pytest.approx(uniform, abs=1e-3)  # mss really depends on N


def test_independent_latents_give_tc_near_zero():
    """mu_j ~ N(0, diag(s^2)), q(z|x_j) = N(mu_j, sigma^2 I): q(z) = N(0, diag(s^2 + sigma^2)),
    which factorizes, TC = 0. Large batch (M = 1024): |estimate| < 0.05 nats for N = 1e9
    (nearly leave-one-out, biased low: measured -0.01..-0.03) and N = M (own sample
    included, biased high: +0.01..+0.04), while the correlated codes below read ~0.31."""
    m = 1024
    s = torch.tensor([1.0, 0.7, 1.5], dtype=F64)
    sigma = 0.5
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        mu = torch.randn(m, 3, generator=g, dtype=F64) * s
        z = mu + sigma * torch.randn(m, 3, generator=g, dtype=F64)
        lv = torch.full_like(mu, 2 * math.log(sigma))
        assert -0.05 < _estimate(mu, lv, z, 10**9) < 0.0
        assert 0.0 < _estimate(mu, lv, z, m) < 0.05


S3 = torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.0, 0.4], [0.3, 0.4, 1.0]], dtype=F64)
SIGMA2 = 0.3


def _correlated_codes(m: int, seed: int):
    """q(z|x_j) = N(mu_j, sigma^2 I), mu_j ~ N(0, S - sigma^2 I): the aggregate posterior is N(0, S)."""
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(S3 - SIGMA2 * torch.eye(3, dtype=F64))
    mu = torch.randn(m, 3, generator=g, dtype=F64) @ chol.T
    z = mu + math.sqrt(SIGMA2) * torch.randn(m, 3, generator=g, dtype=F64)
    return mu, torch.full_like(mu, math.log(SIGMA2)), z


def test_mss_converges_to_gaussian_tc_of_aggregate_posterior():
    """The dataset is a continuum (N = 1e9): the MSS estimate, averaged over 4 fixed-seed
    batches, is within 5% of the true TC = gaussian_total_correlation(S) at M = 2048 and
    further off at M = 32 (measured: -2.6% and -37%)."""
    true = gaussian_total_correlation(S3).item()
    assert true == pytest.approx(0.31368, abs=1e-4)
    errors = {}
    for m in (32, 2048):
        values = [_estimate(*_correlated_codes(m, seed), dataset_size=10**9) for seed in range(4)]
        errors[m] = abs(sum(values) / len(values) / true - 1)
    assert errors[2048] < 0.05, errors
    assert errors[2048] < errors[32], errors
    mu, lv, z = _correlated_codes(1024, 7)
    assert _estimate(mu, lv, z, 10**9) > 0.25  # far from the independent case's ~0


def test_gaussian_total_correlation_closed_forms():
    for rho in (0.0, 0.3, -0.7, 0.95):
        for scale in (1.0, 4.0):
            cov = torch.tensor([[scale, rho * math.sqrt(scale)], [rho * math.sqrt(scale), 1.0]], dtype=F64)
            assert gaussian_total_correlation(cov).item() == pytest.approx(-0.5 * math.log(1 - rho**2), abs=1e-12)
    assert gaussian_total_correlation(torch.diag(torch.tensor([0.1, 2.0, 30.0], dtype=F64))).item() == \
        pytest.approx(0.0, abs=1e-12)
    # In general -1/2 log det of the correlation matrix.
    d = torch.sqrt(torch.diagonal(S3))
    corr = S3 / torch.outer(d, d)
    assert gaussian_total_correlation(S3 * 3).item() == pytest.approx(-0.5 * torch.logdet(corr).item(), rel=1e-12)


# ---------------------------------------------------------------- config validation

BN_CFG = dict(num_layers=2, hidden_size=16, num_heads=2, max_seq_len=16, bottleneck_layer=1, bottleneck_dim=4)


def _parse(entry, **cfg_kwargs):
    from tti_dist.config.schema import ModelConfig
    from tti_dist.regularizers import checked_regularizers

    return checked_regularizers([entry], ModelConfig(**{**BN_CFG, **cfg_kwargs}))


@pytest.mark.parametrize("entry, field", [
    ({"type": "kl", "hookpoints": ["blocks.1.bottleneck.mu"]}, "regularizers[0].hookpoints: 'blocks.1.bottleneck.mu' "
     "is not a bottleneck latent; 'kl' reads blocks.<i>.bottleneck.z only; allowed: blocks.1.bottleneck.z"),
    ({"type": "kl", "hookpoints": ["blocks.*.mlp.act"]}, "regularizers[0].hookpoints: 'blocks.0.mlp.act'"),
    ({"type": "total_correlation", "hookpoints": ["blocks.1.bottleneck.*"]},
     "regularizers[0].hookpoints: 'blocks.1.bottleneck.mu' is not a bottleneck latent; 'total_correlation'"),
    ({"type": "total_correlation", "hookpoints": ["blocks.1.bottleneck.z"], "dataset_size": 1},
     "regularizers[0].dataset_size: 1 must be an integer >= 2"),
    ({"type": "total_correlation", "hookpoints": ["blocks.1.bottleneck.z"], "max_tokens": 1},
     "regularizers[0].max_tokens: 1 must be an integer >= 2"),
    ({"type": "total_correlation", "hookpoints": ["blocks.1.bottleneck.z"], "max_tokens": None},
     "regularizers[0].max_tokens"),
    ({"type": "total_correlation", "hookpoints": ["blocks.1.bottleneck.z"], "estimator": "mxs"},
     "regularizers[0].estimator"),
    ({"type": "total_correlation", "hookpoints": ["blocks.1.bottleneck.z"], "seed": -2}, "regularizers[0].seed"),
    ({"type": "total_correlation", "hookpoints": ["blocks.1.bottleneck.z"], "dataset_sise": 10},
     "regularizers[0].dataset_sise: unknown key for type 'total_correlation'; did you mean 'dataset_size'?"),
])
def test_bad_entries_name_the_field(entry, field):
    from tti_dist.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        _parse(entry)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(field), msg


@pytest.mark.parametrize("kind", ["kl", "total_correlation"])
def test_no_bottleneck_in_model_lists_nothing_allowed(kind):
    from tti_dist.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        _parse({"type": kind, "hookpoints": ["blocks.0.resid_post"]}, bottleneck_layer=None)
    assert str(exc.value) == (f"regularizers[0].hookpoints: 'blocks.0.resid_post' is not a bottleneck latent; "
                              f"{kind!r} reads blocks.<i>.bottleneck.z only; allowed: none (model.bottleneck_layer is null)")


def test_good_entries_parse_with_defaults():
    from tti_dist.config.regularizers import TotalCorrelationConfig

    (kl,) = _parse({"type": "kl", "coefficient": 0.1, "hookpoints": ["blocks.*.bottleneck.z"]})
    assert kl.type == "kl" and kl.hookpoints == ("blocks.*.bottleneck.z",)
    (tc,) = _parse({"type": "total_correlation", "hookpoints": ["blocks.1.bottleneck.z"]})
    assert tc.params == TotalCorrelationConfig(estimator="mss", dataset_size=None, max_tokens=256, seed=0)
    (tc,) = _parse({"type": "total_correlation", "hookpoints": ["blocks.1.bottleneck.z"], "estimator": "mws",
                    "dataset_size": 1_000_000, "max_tokens": 64, "seed": 3})
    assert tc.params == TotalCorrelationConfig(estimator="mws", dataset_size=1_000_000, max_tokens=64, seed=3)


def test_decorrelation_knows_bottleneck_widths():
    """hookpoint_width (names.py) gives decorrelation the latent width: 1 latent is an error."""
    from tti_dist.models.layout import hookpoint_width
    from tti_dist.config.schema import ModelConfig
    from tti_dist.errors import ConfigError

    cfg = ModelConfig(**{**BN_CFG, "bottleneck_dim": 1})
    assert hookpoint_width("blocks.1.bottleneck.mu", cfg) == 1
    assert hookpoint_width("blocks.1.bottleneck.out", cfg) == 16
    assert hookpoint_width("blocks.0.mlp.act", cfg) == 64
    with pytest.raises(ConfigError, match=r"^regularizers\[0\]\.hookpoints: blocks\.1\.bottleneck\.z has width < 2"):
        _parse({"type": "decorrelation", "hookpoints": ["blocks.1.bottleneck.z"]}, bottleneck_dim=1)
    _parse({"type": "decorrelation", "hookpoints": ["blocks.1.bottleneck.z"]})  # 4 latents: fine
