"""L1 activation sparsity on (possibly tensor-parallel-sharded) activations."""

from __future__ import annotations

import torch

from tti_dist.config.regularizers import L1Config
from tti_dist.distributed.collectives import sum_with_identity_grad
from tti_dist.regularizers.base import Regularizer, register


@register
class L1Activation(Regularizer):
    """L1 penalty on activations: the exact global mean absolute activation.

    For each hookpoint with activations a (N tokens x D units, D the global width):
        L1(a) = (1 / (N D)) * sum_t sum_u |a_tu|
    and the loss is the mean of L1 over the regularizer's hookpoints. The L1 norm as a
    sparsity-inducing penalty is the lasso (Tibshirani 1996); on activations it is the
    sparse-coding objective (Olshausen & Field 1996; Lee et al. 2007) that SAEs also use.

    Reduce group: TP. For a TP-sharded hookpoint each rank sums |a| over its D/tp units and
    the sums are all-reduced over the TP group (`sum_with_identity_grad`:
    all-reduce forward, identity backward), so every TP rank holds the same global value and
    the gradient reaching each local unit is sign(a)/(N D), exactly as at TP=1. Replicated
    hookpoints need no communication. DP: a mean over the local batch; DeepSpeed's gradient
    averaging makes the update that of the global-batch mean.
    Communication: two scalar all-reduces (|a| sum, nonzero count) per sharded hookpoint per
    micro-step.
    Cost: one pass over the activations (|a|, sum).
    Precision: the sum accumulates in fp32 for bf16/fp16/fp32 activations and in fp64 for
    fp64 ones (the loss has that dtype); the gradient has the activations' dtype.

    Metrics: `l0` = mean over tokens of the number of nonzero units (docs/metrics.md#l0;
    exact zeros, so it is the width for GELU activations and informative for ReLU/top-k),
    reduced over TP like the loss.
    """

    Config = L1Config

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = 0.0
        l0 = 0.0
        for hp in self.hookpoints:
            a = acts[hp.name]
            num_tokens = a.numel() // a.shape[-1]
            # vector_norm(ord=1) and count_nonzero are single fused reductions: no |a| or
            # boolean tensor of the activation's size is materialised.
            # At least fp32: vector_norm refuses a dtype narrower than its input's.
            acc = torch.promote_types(a.dtype, torch.float32)
            local = torch.linalg.vector_norm(a, ord=1, dtype=acc)
            nonzero = torch.count_nonzero(a.detach()).to(acc)
            if hp.tp_sharded and self.groups.tp_size > 1:
                local = sum_with_identity_grad(local, self.groups.tp_group)
                nonzero = sum_with_identity_grad(nonzero, self.groups.tp_group)
            total = total + local / (num_tokens * hp.global_dim)
            l0 = l0 + nonzero / num_tokens
        n = len(self.hookpoints)
        return total / n, {"l0": l0 / n}
