"""Initial SAE weights that do not depend on tp_size, and the data-dependent b_pre estimates.

Decoder directions: the directions of latents [c C, (c+1) C) (chunks of C =
INIT_CHUNK_LATENTS latents) are drawn from a private torch.Generator seeded with
splitmix_seed(seed, c) (tti_dist.utils.seeding), normalized to unit length; the SAE sets
W_dec to their columns and W_enc = W_dec^T (Gao et al. 2024). A TP rank draws only the
chunks that overlap its slice of the latents, so the weights of a latent are the same at
every TP degree. The global RNG is never touched.

b_pre: the mean or the geometric median of sample inputs of all DP ranks (`b_pre_estimate`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tti_dist.config.sae import NORM_EPS
from tti_dist.utils.seeding import splitmix_seed

INIT_CHUNK_LATENTS = 1024
"""Latents per private-generator draw at initialisation (part of the init's definition:
changing it changes the weights a seed produces)."""


def init_decoder_rows(num_latents: int, d_model: int, seed: int, lo: int, hi: int) -> torch.Tensor:
    """Unit-norm decoder directions of latents [lo, hi) as rows [hi - lo, d] (fp32, CPU)."""
    rows = []
    for chunk in range(lo // INIT_CHUNK_LATENTS, (hi - 1) // INIT_CHUNK_LATENTS + 1):
        start = chunk * INIT_CHUNK_LATENTS
        size = min(INIT_CHUNK_LATENTS, num_latents - start)
        gen = torch.Generator(device="cpu").manual_seed(splitmix_seed(seed, chunk))
        block = torch.randn(size, d_model, generator=gen, dtype=torch.float32)
        rows.append(block[max(lo - start, 0): min(hi - start, size)])
    w = torch.cat(rows)
    return w / w.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


@torch.no_grad()
def b_pre_estimate(x: torch.Tensor, method: str, dp_group: dist.ProcessGroup | None = None, num_iters: int = 32,
                   eps: float = 1e-8) -> torch.Tensor:
    """The pre-encoder bias estimated from this DP rank's samples x [N, d] and all other DP ranks'.

    method:
      "mean"             b = (sum over all ranks' samples of x) / (their count).
      "geometric_median" argmin_y sum_i ||x_i - y||, by Weiszfeld's iterations from the
                         mean: y <- sum_i w_i x_i / sum_i w_i, w_i = 1 / max(||x_i - y||, eps),
                         num_iters times (a fixed count, so every rank stops together).
    Every sum is all-reduced over dp_group (one all-reduce of d + 1 values of x's dtype per
    iteration), so the result equals the value on the concatenated samples. Rank sample
    counts may differ (even 0 on a rank); the total must be > 0. Returns [d] in x's dtype.
    """
    if method not in ("geometric_median", "mean"):
        raise ValueError(f"b_pre_estimate: method {method!r}; allowed: 'geometric_median', 'mean'")

    def weighted_mean(w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            stats = torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])])
        else:
            stats = torch.cat([(w[:, None] * x).sum(dim=0), w.sum().reshape(1)])
        if dp_group is not None:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=dp_group)
        return stats[:-1] / stats[-1]

    y = weighted_mean(None)
    if not torch.isfinite(y).all():
        raise ValueError("init_b_pre: no samples on any DP rank (or non-finite samples)")
    if method == "geometric_median":
        for _ in range(num_iters):
            w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
            y = weighted_mean(w)
    return y
