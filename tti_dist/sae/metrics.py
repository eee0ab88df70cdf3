"""SAE quality metrics, exactly as defined in docs/metrics.md.

Tokens are all leading dimensions of an activation [..., d]; "E" is the mean over tokens.
Every function that communicates takes its group explicitly and reduces only when the
group is given (None: this process's data only). Reductions are float64 sums, so an
accumulation over an eval set, split over DP ranks in any way, equals the one-shot value
up to rounding. No autograd: these are measurements (inputs are detached).

Tags (sae/<site>/*, written by tti_dist.sae.splice; see docs/sae.md):
sae/<site>/ev, fvu, l0, dead_fraction, dense_fraction_1pct, dense_fraction_10pct,
shrinkage, redundancy, ce_loss_recovered, delta_lm_loss, kl_score.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tti_dist.distributed.collectives import all_gather_single

_F64 = torch.float64


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1]).to(_F64)


class ExplainedVarianceAccumulator:
    """Running sums for explained variance (and shrinkage) over an eval set (docs/metrics.md#explained-variance).

        EV  = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2),   FVU = 1 - EV,
        shrinkage = E||x_hat||^2 / E[x . x_hat],

    expectations over all tokens seen (by `update`, on every rank of `group` in `compute`).
    The denominator is the total variance of x (trace of its covariance), so predicting the
    per-dimension mean scores EV = 0 and a perfect reconstruction EV = 1. This is the variant
    we report; it is not the per-token mean of 1 - ||x - x_hat||^2 / ||x - mean||^2 nor
    NMSE = ||x_hat - x||^2 / ||x||^2 that some libraries emit.

    State: float64 sums [sum ||x - x_hat||^2, sum ||x||^2, sum ||x_hat||^2, sum x . x_hat,
    token count, sum x (d)]. `compute(group)` all-reduces a copy over `group` (DP: d + 5
    float64 per call) and leaves the local sums untouched.
    """

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> "ExplainedVarianceAccumulator":
        """Add tokens: x, x_hat [..., d] (same shape)."""
        if x.shape != x_hat.shape:
            raise ValueError(f"ExplainedVarianceAccumulator: x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}")
        a, b = _rows(x), _rows(x_hat)
        stats = torch.cat([
            torch.stack([(a - b).pow(2).sum(), a.pow(2).sum(), b.pow(2).sum(), (a * b).sum(),
                         a.new_tensor(float(a.shape[0]))]),
            a.sum(dim=0),
        ])
        self._sums = stats if self._sums is None else self._sums + stats
        return self

    def _reduced(self, group: dist.ProcessGroup | None) -> torch.Tensor:
        if self._sums is None:
            raise ValueError("ExplainedVarianceAccumulator: no tokens (call update first)")
        sums = self._sums.clone()
        if _group_size(group) > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return sums

    def compute(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """EV (float64 scalar) over all tokens seen on the ranks of `group`."""
        s = self._reduced(group)
        n = s[4]
        mean = s[5:] / n
        variance = s[1] / n - mean.pow(2).sum()
        return 1.0 - (s[0] / n) / variance

    def shrinkage(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """E||x_hat||^2 / E[x . x_hat] (float64 scalar) over all tokens seen on the ranks of `group`."""
        s = self._reduced(group)
        return s[2] / s[3]


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """EV = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) over the tokens of x [..., d].

    Definition: docs/metrics.md#explained-variance. float64 scalar; with `group`, over the
    tokens of all its ranks. See ExplainedVarianceAccumulator.
    """
    return ExplainedVarianceAccumulator().update(x, x_hat).compute(group)


def shrinkage(x: torch.Tensor, x_hat: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Shrinkage = E||x_hat||^2 / E[x . x_hat] (docs/metrics.md#shrinkage); 1 for x_hat = x, < 1 when x_hat shrinks.

    For x_hat = c x it is c. float64 scalar; with `group`, over the tokens of all its ranks.
    """
    return ExplainedVarianceAccumulator().update(x, x_hat).shrinkage(group)


def l0(f: torch.Tensor, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L0 = mean over tokens of the number of nonzero latents (docs/metrics.md#l0).

    f: local latents [..., n/tp]; the per-token counts are summed over `tp_group` (one
    float64 scalar all-reduce), so the value is the whole SAE's L0 on every TP rank.
    """
    count = torch.count_nonzero(f.detach()).to(_F64).reshape(1)
    if _group_size(tp_group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=tp_group)
    return count[0] / (f.numel() // f.shape[-1])


def latent_density(f: torch.Tensor, dp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per local latent, the share of tokens on which it fired (f != 0): float64 [n/tp].

    With dp_group, over the tokens of all DP ranks (one all-reduce of n/tp + 1 float64).
    """
    rows = f.detach().reshape(-1, f.shape[-1])
    packed = torch.cat([(rows != 0).sum(dim=0).to(_F64), rows.new_tensor([rows.shape[0]], dtype=_F64)])
    if _group_size(dp_group) > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=dp_group)
    return packed[:-1] / packed[-1]


def _share(flags: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    packed = torch.stack([flags.sum().to(_F64), torch.tensor(float(flags.numel()), dtype=_F64, device=flags.device)])
    if _group_size(tp_group) > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
    return packed[0] / packed[1]


def dead_fraction(dead: torch.Tensor, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Share of all n latents that are dead (docs/metrics.md#dead-and-dense-units).

    dead: local bool [n/tp]: in training FiringTracker.dead_mask() (no firing in the last
    dead_window_tokens tokens); on an eval set `latent_density(f) == 0`. One all-reduce of
    2 float64 over tp_group.
    """
    return _share(dead.detach().reshape(-1).bool(), tp_group)


def dense_fraction(density: torch.Tensor, threshold: float, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Share of all n latents with firing density > threshold (report 0.01 and 0.1;
    docs/metrics.md#dead-and-dense-units).

    density: local [n/tp] (latent_density or FiringTracker.density()). One all-reduce of
    2 float64 over tp_group.
    """
    return _share(density.detach().reshape(-1) > threshold, tp_group)


def decoder_redundancy(
    W_dec_local: torch.Tensor, tp_group: dist.ProcessGroup | None = None, block_size: int = 1024
) -> torch.Tensor:
    """Redundancy = mean over latents i of max_{j != i} cos(W_dec[:, i], W_dec[:, j])
    (docs/metrics.md#decoder-redundancy).

    Signed cosine over all n latents of all TP shards (a latent's duplicate scores 1, its
    negation -1). W_dec_local: this rank's [d, n/tp] columns (any norm; normalized here,
    in fp32). The normalized columns are all-gathered over tp_group: each rank receives
    (tp - 1) n/tp d fp32 values, 4 d n (tp - 1)/tp bytes; then rank r computes the max
    cosines of its own latents against all n in blocks of block_size rows ([block_size, n]
    fp32 at a time, 2 d n^2 / tp FLOPs), and one float64 scalar all-reduce sums them.
    Returns the same float64 scalar on every TP rank. Needs n >= 2.
    """
    w = W_dec_local.detach().float()
    w = (w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)).t().contiguous()  # [n/tp, d]
    size = _group_size(tp_group)
    n_l = w.shape[0]
    if size > 1:
        rank = dist.get_rank(tp_group)
        full = w.new_empty((size * n_l, w.shape[1]))
        all_gather_single(full, w, group=tp_group)
    else:
        rank, full = 0, w
    if full.shape[0] < 2:
        raise ValueError("decoder_redundancy: needs at least 2 latents")
    total = torch.zeros(1, dtype=_F64, device=w.device)
    for start in range(0, n_l, block_size):
        rows = w[start:start + block_size]
        cos = rows @ full.t()
        ar = torch.arange(rows.shape[0], device=w.device)
        cos[ar, rank * n_l + start + ar] = float("-inf")
        total += cos.max(dim=1).values.to(_F64).sum()
    if size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=tp_group)
    return total[0] / full.shape[0]


def ce_loss_recovered(ce_clean, ce_spliced, ce_zero):
    """CE loss recovered = (CE_zero_ablate - CE_spliced) / (CE_zero_ablate - CE_clean) (docs/metrics.md#splice-metrics).

    1 when splicing the SAE's reconstruction in costs nothing (spliced == clean), 0 when it
    is as bad as zero-ablating the site. Floats or tensors.
    """
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def delta_lm_loss(ce_clean, ce_spliced):
    """Delta LM loss = CE_spliced - CE_clean (docs/metrics.md#splice-metrics); 0 for a lossless splice."""
    return ce_spliced - ce_clean


def kl_score(kl_spliced, kl_zero):
    """KL score = (KL_zero_ablate - KL_spliced) / KL_zero_ablate, KLs to the clean logits
    (docs/metrics.md#splice-metrics).

    The CE-recovered formula with KL in place of CE (the clean run's KL to itself is 0).
    """
    return (kl_zero - kl_spliced) / kl_zero
