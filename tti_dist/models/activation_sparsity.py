"""AbsTopK activation sparsity at the residual stream's reads and writes (Gao et al. 2025).

Per token, at each selected site, only the k entries of largest magnitude are kept (sign
included) and the rest are set to zero:

    AbsTopK_k(x) = x * 1[ |x_i| is among the k largest |x_j| of the token ],
    k = floor(model.abs_topk_fraction * width)

Source: Gao et al. 2025, "Weight-sparse transformers have interpretable circuits", section
on activation sparsity, and the released openai/circuit_sparsity model (its `afrac` and
`afrac_loctypes`: fraction 1/4 at attn_in, attn_out, mlp_in, mlp_out by default). Sites,
with width d = model.hidden_size:

    attn_in   the attention block's input, LayerNorm1(resid_pre)         replicated
    attn_q    the queries of all heads, per token ([heads x head_dim])    TP-sharded by head
    attn_k    the keys, likewise                                          TP-sharded by head
    attn_v    the values, likewise                                        TP-sharded by head
    attn_out  the attention output written to the stream (hook attn.out)  replicated
    mlp_in    the MLP's input, LayerNorm2(resid_mid)                      replicated
    mlp_out   the MLP's (or MoE layer's) output (hook mlp.out / moe.out)  replicated
    resid_mid the stream after the attention write (hook resid_mid)       replicated
    resid_post the stream after the MLP write (hook resid_post)           replicated

The reference's `mlp_neuron` site is `model.mlp_topk` with `mlp_topk_by: abs` here (k in
units rather than as a fraction). Where a site has a hookpoint, the hookpoint records the
sparsified value: what the next layer reads is what an SAE, a transcoder or a circuit
sees.

Tensor parallelism: the replicated sites hold the same tensor on every TP rank (it comes
after megatron's all-reduce, or before any TP layer), so each rank computes the same mask
locally, with no communication, and that mask is the TP=1 one bit for bit. q, k and v are
split by head; their mask is the distributed `topk_mask` over the TP group (one all-gather
of each rank's k largest magnitudes per token), equal to TP=1's. Ties go to the lower
index in both cases (models.sparsity.topk_mask), where torch.topk leaves them undefined.

Gradients pass through the kept entries only (the mask is a constant of the backward).
Cost per site: one torch.topk of k over each token's width and an elementwise product;
no parameters, so checkpoints and weights are unchanged by the option.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tti_dist.config.schema import ModelConfig
from tti_dist.models.sparsity import topk_mask

SHARDED_SITES = frozenset({"attn_q", "attn_k", "attn_v"})
"""Sites whose tensor is split across TP ranks (by head); the others are replicated."""


class AbsTopK(nn.Module):
    """AbsTopK_k over the last dimension at one site, or the identity when the site is off.

    `width` is the site's global width; for a TP-sharded site the input is this rank's
    contiguous slice of it and the selection is made jointly over `tp_group`."""

    def __init__(self, cfg: ModelConfig, site: str, tp_group=None):
        super().__init__()
        self.site = site
        self.k = cfg.abs_topk_k if site in cfg.abs_topk_sites else 0
        self.tp_group = None
        self.tp_size, self.tp_rank = 1, 0
        if self.k and site in SHARDED_SITES and tp_group is not None:
            self.tp_group = tp_group
            self.tp_size, self.tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)

    @property
    def active(self) -> bool:
        """Whether this site sparsifies (False: forward returns its input unchanged)."""
        return self.k > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.k:
            return x
        return x * topk_mask(x, self.k, by="abs", tp_group=self.tp_group, tp_size=self.tp_size,
                             tp_rank=self.tp_rank)

    def extra_repr(self) -> str:
        return f"site={self.site}, k={self.k}"
