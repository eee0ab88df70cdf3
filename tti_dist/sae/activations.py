"""The SAE's activation step: latents from pre-activations, for every activation, exact under TP.

`activate(pre, cfg, tp, training=...)` is a function of the local pre-activations
[rows, n/tp] (rows = the micro-batch's tokens), the settings, the TP shard and the mode; it
returns the local latents f and what a sparse decode needs (`Activation`). The module
(tti_dist/sae/model.py) decodes, keeps the running BatchTopK threshold and computes the losses;
a transcoder can reuse this step unchanged. Latents are sharded contiguously over the TP
group: rank r holds global latents [r n/tp, (r+1) n/tp).

    relu       f = ReLU(pre)                                   (Bricken et al. 2023)
    topk       f = ReLU(pre) * topk_mask_per_token(pre, k)     (Gao et al. 2024)
    batchtopk  training: f = ReLU(pre) * M, M = the k*B largest pre-activations of the whole
               micro-batch of B tokens (all latents of all tokens together);
               eval: f = pre * 1[pre > theta] with the global threshold theta
               (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders")
    matryoshka the same selection as batchtopk (its nested loss is the module's; Bussmann et
               al. 2025, "Learning Multi-Level Features with Matryoshka Sparse Autoencoders")
    jumprelu   f = pre * H(pre - theta_i), theta_i = exp(log_threshold_i) per latent
               (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
               Fidelity with JumpReLU SAEs"), with straight-through gradients (below)

Communication (T = rows, tp = TP size, 4-byte values; nothing at tp = 1):
  - topk: one all-gather over TP of T min(k, n/tp) values (`topk_mask`).
  - batchtopk / matryoshka, training: one all-gather over TP of min(k T, n T / tp) values
    (`topk_mask` on one row of n T / tp keys) and one all-reduce MIN of a float64 (the batch
    minimum for the threshold). Eval: none (the threshold is replicated).
  - relu, jumprelu: none (elementwise and local; jumprelu's L0 penalty is one scalar
    all-reduce, `jumprelu_l0`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tti_dist.config.sae import BATCH_SELECTIONS, SAEConfig
from tti_dist.distributed.collectives import sum_with_identity_grad
from tti_dist.models.sparsity import topk_mask


@dataclass(frozen=True)
class TPShard:
    """The TP group that shares the latents: this rank holds latents [rank n/size, (rank+1) n/size)."""

    group: dist.ProcessGroup | None = None
    size: int = 1
    rank: int = 0


@dataclass
class Activation:
    """What `activate` returns (all local to this TP rank)."""

    latents: torch.Tensor
    """f [rows, n/tp] (with autograd graph)."""
    mask: torch.Tensor | None
    """bool [rows, n/tp]: the selected latents (topk, batchtopk / matryoshka in training;
    before the ReLU, so a selected latent may have f = 0) or the open gates pre > theta
    (jumprelu, batchtopk / matryoshka in eval); None for relu."""
    idx: torch.Tensor | None
    """[rows, m] local latent indices listing every nonzero of f (other listed latents have
    f = 0 and no gradient), for the embedding-bag decode; None: decode densely."""
    batch_min: torch.Tensor | None
    """batchtopk / matryoshka in training: the smallest positive selected activation of the
    micro-batch over all TP ranks (float64 scalar, replicated over TP; +inf when none is
    positive), the input of the running threshold (`update_threshold`). Else None."""


def selected_index(pre: torch.Tensor, mask: torch.Tensor, m: int) -> torch.Tensor:
    """[rows, min(m, n/tp)] local indices whose first entries are each row's masked latents
    (m >= the largest per-row count): one torch.topk over the masked pre-activations."""
    key = pre.detach().masked_fill(~mask, float("-inf"))
    return torch.topk(key, max(1, min(m, key.shape[-1])), dim=-1, sorted=False).indices


def batchtopk_mask(pre: torch.Tensor, k: int, tp: TPShard) -> torch.Tensor:
    """Bool [rows, n/tp]: the k * rows largest pre-activations of the whole micro-batch, over all TP ranks.

    Exact at any TP degree, ties included: the local keys are laid out latent-major,
    pre^T [n/tp, rows] flattened, so global latent j of token t has the flat index
    j * rows + t and rank r's keys are the contiguous slice [r n rows / tp, (r+1) n rows / tp)
    of the global latent-major order. `topk_mask` on that one row then selects the first
    k * rows keys in (value desc, flat index asc) order: ties go to the lower latent, then
    to the lower token, as at TP=1.
    Communication: `topk_mask`'s all-gather of tp x min(k rows, n rows / tp) values.
    Cost: one torch.topk of min(k rows, n rows / tp) over the n rows / tp local keys.
    """
    rows, n_local = pre.shape
    key = pre.detach().t().reshape(1, n_local * rows)
    sel = topk_mask(key, k * rows, by="value", tp_group=tp.group, tp_size=tp.size, tp_rank=tp.rank)
    return sel.view(n_local, rows).t()


@torch.no_grad()
def global_min_positive(f: torch.Tensor, tp: TPShard) -> torch.Tensor:
    """min of f over its positive entries on all TP ranks (float64 scalar; +inf if none): one all-reduce MIN."""
    f = f.detach()
    local = torch.where(f > 0, f, torch.full((), math.inf, dtype=f.dtype, device=f.device))
    value = (local.amin() if local.numel() else torch.tensor(math.inf, device=f.device)).to(torch.float64)
    value = value.reshape(1)
    if tp.size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=tp.group)
    return value[0]


@torch.no_grad()
def update_threshold(theta: torch.Tensor, batch_min: torch.Tensor, lr: float,
                     dp_group: dist.ProcessGroup | None = None) -> None:
    """The running BatchTopK inference threshold, updated in place (a float64 scalar buffer).

        m      = mean over the DP ranks whose batch had a positive selected activation of
                 their batch_min (all-reduce SUM of 2 float64 over dp_group)
        theta <- m                          on the first update (theta < 0 means "unset",
                                            as dictionary_learning's BatchTopKTrainer)
        theta <- (1 - lr) theta + lr m      afterwards (SAELens's topk_threshold_lr)

    and unchanged when no DP rank had a positive activation. Every rank starts from the same
    theta and applies the same update, so theta stays identical over TP and DP (averaging
    the per-batch minima before the EMA equals averaging the ranks' estimates). No host sync.
    """
    has = torch.isfinite(batch_min)
    stats = torch.stack([torch.where(has, batch_min, torch.zeros_like(batch_min)), has.to(torch.float64)])
    if dp_group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=dp_group)
    mean = stats[0] / stats[1].clamp_min(1.0)
    new = torch.where(theta < 0, mean, (1.0 - lr) * theta + lr * mean)
    theta.copy_(torch.where(stats[1] > 0, new, theta))


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1[-1/2 < u < 1/2], the rectangle kernel of Rajamanoharan et al. (2024)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(-1, n).sum(dim=0)


class _JumpReLU(torch.autograd.Function):
    """JumpReLU(z, theta) = z H(z - theta); d/dz = H(z - theta); d/dtheta = -(theta / eps) K((z - theta) / eps).

    The pseudo-derivative wrt theta is the paper's straight-through estimator (eq. 11; SAELens
    jumprelu_sae.JumpReLU without ste_to_input). theta broadcasts over the leading dims of z."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        d_theta = -(theta / eps) * _rectangle((z - theta) / eps) * grad
        return (z > theta).to(grad.dtype) * grad, _sum_to(d_theta, theta.numel()), None


class _Step(torch.autograd.Function):
    """H(z - theta); d/dz = 0; d/dtheta = -(1 / eps) K((z - theta) / eps) (the paper's eq. 12)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        d_theta = -(1.0 / eps) * _rectangle((z - theta) / eps) * grad
        return None, _sum_to(d_theta, theta.numel()), None


def jumprelu(pre: torch.Tensor, log_threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """f = pre * H(pre - theta), theta = exp(log_threshold) [n/tp] (module docstring); local, no communication."""
    return _JumpReLU.apply(pre, log_threshold.exp().to(pre.dtype), bandwidth)


def jumprelu_l0(pre: torch.Tensor, log_threshold: torch.Tensor, bandwidth: float, tp: TPShard) -> torch.Tensor:
    """The JumpReLU sparsity penalty mean_t sum_i H(pre_ti - theta_i) over all n latents (replicated scalar).

    Its value is the L0 of f; its gradient reaches only the thresholds, through the STE
    d/dtheta_i = -(1/eps) K((pre - theta_i) / eps) (Rajamanoharan et al. 2024, eq. 12; SAELens
    jumprelu_sae "step" mode). Each rank sums its latents; one scalar all-reduce over TP
    (sum_with_identity_grad: identity backward, exact because the loss is replicated).
    """
    theta = log_threshold.exp().to(pre.dtype)
    local = _Step.apply(pre, theta, bandwidth).sum() / max(1, pre.reshape(-1, pre.shape[-1]).shape[0])
    return local if tp.size == 1 else sum_with_identity_grad(local, tp.group)


def activate(pre: torch.Tensor, cfg: SAEConfig, tp: TPShard, *, training: bool,
             threshold: torch.Tensor | None = None, log_threshold: torch.Tensor | None = None,
             sparse: bool = True) -> Activation:
    """The latents of the local pre-activations pre [rows, n/tp] (formulas: module docstring).

    Args:
        cfg: the SAE's settings (activation, k, jumprelu_bandwidth).
        tp: the TP shard.
        training: batchtopk / matryoshka select with BatchTopK (and report the batch minimum)
            when True and apply the JumpReLU at `threshold` when False; other activations
            are the same in both modes.
        threshold: batchtopk / matryoshka: the running global threshold (float64 scalar;
            < 0 = not yet estimated, used as 0, i.e. a plain ReLU).
        log_threshold: jumprelu: the local log thresholds [n/tp] (a parameter).
        sparse: list the nonzeros in `idx` for an embedding-bag decode (topk; batchtopk,
            whose per-row count varies, costs one host sync for the largest row count).
            jumprelu and matryoshka always decode densely: jumprelu's threshold gradient
            needs dL/df at inactive latents near the threshold, matryoshka decodes per prefix.
    """
    zero = torch.zeros((), dtype=pre.dtype, device=pre.device)
    act = cfg.activation
    if act == "relu":
        return Activation(F.relu(pre), None, None, None)
    if act == "topk":
        mask = topk_mask(pre, cfg.k, by="value", tp_group=tp.group, tp_size=tp.size, tp_rank=tp.rank)
        f = torch.where(mask, F.relu(pre), zero)
        return Activation(f, mask, selected_index(pre, mask, cfg.k) if sparse else None, None)
    if act == "jumprelu":
        if log_threshold is None:
            raise ValueError("activate: jumprelu needs log_threshold")
        f = jumprelu(pre, log_threshold, cfg.jumprelu_bandwidth)
        return Activation(f, pre.detach() > log_threshold.detach().exp().to(pre.dtype), None, None)
    if act not in BATCH_SELECTIONS:
        raise ValueError(f"activate: unknown activation {act!r}")
    batch_min = None
    if training:
        mask = batchtopk_mask(pre, cfg.k, tp)
        f = torch.where(mask, F.relu(pre), zero)
        batch_min = global_min_positive(f, tp)
    else:
        if threshold is None:
            raise ValueError(f"activate: {act} in eval needs the threshold")
        mask = pre.detach() > threshold.clamp_min(0).to(pre.dtype)
        f = torch.where(mask, pre, zero)
    idx = None
    if sparse and act == "batchtopk":
        idx = selected_index(pre, mask, int(mask.sum(dim=-1).max()) if mask.numel() else 1)
    return Activation(f, mask, idx, batch_min)


def prefix_slices(prefixes: tuple[int, ...], offset: int, n_local: int) -> list[tuple[int, int]]:
    """Local [a, b) of each matryoshka group [m_{g-1}, m_g) (m_0 = 0) on the rank holding global
    latents [offset, offset + n_local); a == b where the group has none of them."""
    out, lo = [], 0
    for hi in prefixes:
        a = min(max(lo, offset), offset + n_local) - offset
        b = max(min(hi, offset + n_local), offset) - offset
        out.append((a, max(a, b)))
        lo = hi
    return out


def group_partial_decodes(f: torch.Tensor, w_dec: torch.Tensor, slices: list[tuple[int, int]]) -> torch.Tensor:
    """[G, rows, d]: this rank's decode of each matryoshka group, sum_{i in group g, local} f_i W_dec[:, i].

    Dense per group: G small products whose total work is one dense decode, O(rows n d / tp).
    The module sums them over TP (one all-reduce of G rows d floats) and takes the cumulative
    sum over groups, which gives the prefix reconstructions."""
    parts = []
    for a, b in slices:
        if b > a:
            parts.append(F.linear(f[:, a:b], w_dec[:, a:b]))
        else:
            parts.append(torch.zeros(f.shape[0], w_dec.shape[0], dtype=f.dtype, device=f.device))
    return torch.stack(parts)
