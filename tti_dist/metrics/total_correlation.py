"""Total correlation of a Gaussian encoder's latents: the beta-TCVAE minibatch estimators.

Source: Chen, Li, Grosse, Duvenaud (2018), "Isolating Sources of Disentanglement in
Variational Autoencoders" (NeurIPS), section 3 and appendix C.

The total correlation of the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) over a dataset
of N points is

    TC(z) = KL(q(z) || prod_d q(z_d)) = E_{q(z)} [log q(z) - sum_d log q(z_d)].

With a minibatch of M samples x_1..x_M and z_i ~ q(z|x_i), both densities are estimated with
importance weights w_ij over the minibatch:

    log q(z_i)     ~ logsumexp_j ( sum_d log q(z_id|x_j) + log w_ij )
    log q_d(z_id)  ~ logsumexp_j ( log q(z_id|x_j) + log w_ij )
    TC_i           = log q(z_i) - sum_d log q_d(z_id),        TC = mean_i TC_i.

Pure functions on tensors (no communication); the `total_correlation` regularizer
(tti_dist/regularizers/total_correlation.py) assembles them over TP/DP shards.
"""

from __future__ import annotations

import math

import torch

ESTIMATORS = ("mss", "mws")
"""Importance-weight schemes: minibatch stratified sampling, minibatch weighted sampling."""

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mu, exp(logvar)) (broadcasting):

        log q = -1/2 (log 2 pi + logvar + (z - mu)^2 exp(-logvar)).
    """
    return -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def log_importance_weights(num_samples: int, dataset_size: int, estimator: str, row_offset: int = 0,
                           num_rows: int | None = None, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """log w_ij for rows i in [row_offset, row_offset + num_rows) and all M columns: [rows, M].

    Row i is the sample z_i; column j the posterior q(.|x_j) of minibatch element j; the
    minibatch element of row i itself is column i (global index, hence `row_offset` when a
    rank holds only some rows).

    "mss", minibatch stratified sampling (Chen et al. 2018, appendix C.2), built so that
    every row sums to exactly 1:
        w_ii = 1/N,    w_ij = (N - 1) / (N (M - 1))  for j != i,
    i.e. q(z_i) ~ (1/N) q(z_i|x_i) + ((N-1)/N) mean_{j != i} q(z_i|x_j): the own data point
    has probability 1/N, the other N - 1 are represented by the M - 1 other samples. (The
    published code's weight matrix puts one entry in the wrong column, so one row does not
    sum to 1; this one is built from the formula.) Needs M >= 2. With N = M all weights are
    1/M: the plain mixture of the minibatch's posteriors.

    "mws", minibatch weighted sampling, exactly as Chen et al. write it (log(M N) subtracted):
        w_ij = 1 / (M N)  for all i, j        (rows sum to 1/N, not 1).
    log q(z) and every log q_d(z_d) are then log(N) too small, so the TC estimate is the
    uniform-weight (1/M) estimate plus exactly (D - 1) log N, D the number of latents, for
    any posteriors; in particular when q(z|x) does not depend on x (true TC 0) it reads
    (D - 1) log N. A constant offset: same gradients as the uniform-weight estimate. Read
    "mss" as a value.

    Args:
        num_samples: M, columns (the whole minibatch, all DP ranks' samples).
        dataset_size: N >= 2, size of the dataset the aggregate posterior is over.
        estimator: "mss" or "mws".
        row_offset: global index of the first row held here.
        num_rows: rows held here (default: all M - row_offset).
    """
    m, n = int(num_samples), int(dataset_size)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if n < 2:
        raise ValueError(f"dataset_size must be >= 2, got {n}")
    rows = m - row_offset if num_rows is None else int(num_rows)
    if m < 1 or rows < 0 or row_offset < 0 or row_offset + rows > m:
        raise ValueError(f"rows [{row_offset}, {row_offset + rows}) do not fit in {m} samples")
    if estimator == "mws":
        return torch.full((rows, m), -math.log(m * n), dtype=dtype, device=device)
    if m < 2:
        raise ValueError("the mss estimator needs at least 2 samples")
    # Build in float64, so that the (N - 1)/(N (M - 1)) of a huge N is exact before rounding.
    other = math.log(n - 1) - math.log(n) - math.log(m - 1)
    out = torch.full((rows, m), other, dtype=torch.float64, device=device)
    r = torch.arange(rows, device=device)
    out[r, row_offset + r] = -math.log(n)
    return out.to(dtype)


def total_correlation(log_q_ijd: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """Per-row TC estimates [rows] from log q(z_id|x_j) [rows, M, D] and log w_ij [rows, M]:

        TC_i = logsumexp_j (sum_d log q(z_id|x_j) + log w_ij)
               - sum_d logsumexp_j (log q(z_id|x_j) + log w_ij).
    """
    joint = torch.logsumexp(log_q_ijd.sum(-1) + log_w, dim=1)
    marginals = torch.logsumexp(log_q_ijd + log_w.unsqueeze(-1), dim=1).sum(-1)
    return joint - marginals


def gaussian_total_correlation(cov: torch.Tensor) -> torch.Tensor:
    """TC of a Gaussian with covariance S [D, D] (e.g. the covariance of codes, no labels):

        TC = 1/2 (sum_d log S_dd - log det S),

    the KL from N(0, S) to N(0, diag S); 0 iff S is diagonal. For D = 2 with correlation
    rho it is -1/2 log(1 - rho^2). Exact for a known S; on a sample covariance of N tokens
    it is biased upward by `tti_dist.metrics.activation_stats.gaussian_tc_bias(D, N)`
    (~D(D-1)/(4N) nats), which `gaussian_tc_per_unit` there removes.
    """
    return 0.5 * (torch.log(torch.diagonal(cov)).sum() - torch.logdet(cov))
