"""Activation decorrelation (DeCov) over the global batch, on TP-sharded or replicated activations."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from tti_dist.config.regularizers import DecorrelationConfig
from tti_dist.config.schema import ModelConfig
from tti_dist.distributed.collectives import gather_with_summed_grad, sum_with_identity_grad, sum_with_scaled_grad
from tti_dist.errors import ConfigError
from tti_dist.models.layout import hookpoint_width
from tti_dist.regularizers.base import Regularizer, register
from tti_dist.regularizers.token_sample import TokenSample


@register
class Decorrelation(TokenSample, Regularizer):
    """DeCov activation decorrelation: mean squared off-diagonal covariance of the units.

    Source: Cogswell, Ahmed, Girshick, Zitnick, Batra (2016), "Reducing Overfitting in Deep
    Networks by Decorrelating Representations" (ICLR), the activation-space counterpart of
    weight orthogonality.

    For each hookpoint with activations a (N tokens x D units, D the global width, N the
    tokens of the GLOBAL batch: all DP ranks' local tokens, or their samples of max_tokens):
        mu = (1/N) sum_t a_t,     C = (1/N) sum_t (a_t - mu)(a_t - mu)^T    (population covariance)
        R_ij = C_ij / sqrt((C_ii + eps)(C_jj + eps))                         (if normalize: true)
        loss = (1 / (D (D - 1))) * sum_{i != j} C_ij^2                      (R instead of C if normalize)
    i.e. the mean squared off-diagonal entry. DeCov's own normalization is
    1/2 (||C||_F^2 - ||diag C||_2^2) = 1/2 sum_{i != j} C_ij^2, so this loss is
    DeCov x 2 / (D (D - 1)): width-independent, so one coefficient transfers across sites.
    The regularizer's loss is the mean over its hookpoints. Statistics are computed in fp32
    with autocast disabled. The mean is detached: its gradient path is exactly zero (the
    centred activations sum to zero over the global batch), so it needs no backward.

    Reduce groups and communication, per hookpoint per micro-step (n local tokens after
    sampling, D global width, tp/dp the group sizes, fp32 = 4 bytes):
    - DP, forward: all-reduce of [sum_t a_t, n] (D + 1 floats) -> the global mean.
    - TP (TP-sharded hookpoints only), forward: all-gather of the local [n, D/tp] shard ->
      [n, D] on every TP rank (each receives n D (tp-1)/tp floats); backward: reduce-scatter
      of the [n, D] gradient (same volume). TP rank r then computes only its row block of
      the Gram matrix, rows = its own D/tp units, columns = all D units.
    - DP, forward: all-reduce of that [D/tp, D] centred Gram block plus the D centred sums
      of squares (D^2/tp + D floats); backward: none (gradient x dp_size,
      tti_dist.distributed.collectives.sum_with_scaled_grad), which makes the update after
      DeepSpeed's DP averaging that of the global-batch loss.
    - TP (once per call, if any hookpoint is sharded): all-reduce of 2 floats (the row-block
      sums of the loss and of the metric; sum_with_identity_grad, identity backward).
    Replicated hookpoints (e.g. resid_post) have every TP rank compute the whole D x D block
    (no TP communication; their gradient must be complete on each TP rank anyway).
    Example: D = 3072 (mlp.act of d=768), tp = 2, dp = 8, n = 16k local tokens: TP gather
    100 MB and reduce-scatter 100 MB per rank, DP all-reduce 19 MB per rank per hookpoint.
    Cost: ~2 n D^2 / tp FLOPs forward (the Gram block) and ~4 n D^2 / tp backward, memory
    [n, D] + [D/tp, D] fp32 per hookpoint; use max_tokens to bound n.

    Metrics: `mean_abs_offdiag` = (1 / (D (D - 1))) sum_{i != j} |C_ij| (|R_ij| when
    normalize), averaged over the hookpoints, detached.
    """

    Config = DecorrelationConfig

    def __init__(self, spec, model, groups) -> None:
        super().__init__(spec, model, groups)
        self._calls = 0
        for hp in self.hookpoints:
            if hp.global_dim < 2:
                raise ConfigError(f"{spec.where}.hookpoints: {hp.name} has width {hp.global_dim}; "
                                  "decorrelation needs at least 2 units")

    def state_dict(self) -> dict:
        """The call counter keying the token sample (resume it to repeat an uninterrupted run)."""
        return {"calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counter saved by `state_dict`."""
        self._calls = int(state["calls"])

    @classmethod
    def check_params(cls, params: DecorrelationConfig, model_cfg: ModelConfig, hookpoints: list[str], where: str,
                     tp_size: int) -> None:
        if params.max_tokens is not None and params.max_tokens < 2:
            raise ConfigError(f"{where}.max_tokens: {params.max_tokens!r} must be an integer >= 2 or null (all tokens)")
        if not (math.isfinite(params.eps) and params.eps > 0):
            raise ConfigError(f"{where}.eps: {params.eps!r} must be a finite number > 0")
        if params.seed < 0:
            raise ConfigError(f"{where}.seed: {params.seed!r} must be an integer >= 0")
        for name in hookpoints:
            if hookpoint_width(name, model_cfg) < 2:
                raise ConfigError(f"{where}.hookpoints: {name} has width < 2; decorrelation needs at least 2 units")

    def _block(self, hp, a: torch.Tensor, idx: torch.Tensor | None):
        """(sum of squared, sum of |.|) off-diagonal entries of this rank's row block."""
        g = self.groups
        x = a.reshape(-1, a.shape[-1])
        if idx is not None:
            x = x.index_select(0, idx)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            sharded = hp.tp_sharded and g.tp_size > 1
            if sharded:
                x = gather_with_summed_grad(x, g.tp_group, dim=-1)
            dim = x.shape[1]
            assert dim == hp.global_dim, (hp.name, dim, hp.global_dim)
            stats = torch.cat([x.detach().sum(0), x.new_tensor([x.shape[0]])])
            if g.dp_size > 1:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=g.dp_group)
            num = stats[-1]
            xc = x - stats[:-1] / num
            rows = dim // g.tp_size if sharded else dim
            lo = g.tp_rank * rows if sharded else 0
            gram = xc[:, lo:lo + rows].t() @ xc  # [rows, D]
            packed = torch.cat([gram.reshape(-1), (xc * xc).sum(0)])
            if g.dp_size > 1:
                packed = sum_with_scaled_grad(packed, g.dp_group)
            c = packed[: rows * dim].view(rows, dim) / num
            if self.params.normalize:
                std = (packed[rows * dim:] / num + self.params.eps).sqrt()
                c = c / (std[lo:lo + rows, None] * std[None, :])
            mask = torch.ones_like(c)
            ar = torch.arange(rows, device=c.device)
            mask[ar, lo + ar] = 0
            off = c * mask
            return (off * off).sum(), off.detach().abs().sum(), sharded

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        call, self._calls = self._calls, self._calls + 1
        first = acts[self.hookpoints[0].name]
        num_tokens = first.numel() // first.shape[-1]
        idx = self.token_index(num_tokens, call, first.device)
        sharded_part = None
        total = first.new_zeros((), dtype=torch.float32)
        abs_total = first.new_zeros((), dtype=torch.float32)
        for hp in self.hookpoints:
            sq, ab, sharded = self._block(hp, acts[hp.name], idx)
            denom = hp.global_dim * (hp.global_dim - 1)
            pair = torch.stack([sq, ab]) / denom
            if sharded:
                sharded_part = pair if sharded_part is None else sharded_part + pair
            else:
                total = total + pair[0]
                abs_total = abs_total + pair[1]
        if sharded_part is not None:
            sharded_part = sum_with_identity_grad(sharded_part, self.groups.tp_group)
            total = total + sharded_part[0]
            abs_total = abs_total + sharded_part[1].detach()
        n = len(self.hookpoints)
        return total / n, {"mean_abs_offdiag": abs_total.detach() / n}
