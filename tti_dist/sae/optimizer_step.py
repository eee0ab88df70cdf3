"""The SAE's own optimizer step, one function for co-training and for `tti sae fit`.

An SAE trains beside (or after) the language model with its own Adam, not DeepSpeed's
optimizer: its latents are sharded over the TP group like a column-parallel layer, while
DeepSpeed would treat its parameters as the model's. One step:

    g <- (sum of the micro-steps' gradients) / micro_steps        (mean over micro-steps)
    g <- all_reduce_sum(g, DP group) / dp_size                     (mean over DP: one all-reduce)
    g_dec <- g_dec - <g_dec, w_dec> w_dec per decoder column        (remove_parallel_gradient)
    Adam step; zero the gradients; renormalize decoder columns to unit norm

(Bricken et al. 2023, "Towards Monosemanticity": unit-norm decoder columns with the
gradient component parallel to them removed; Gao et al. 2024 for TopK SAEs.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tti_dist.sae.model import ParallelSAE


@torch.no_grad()
def sae_optimizer_step(sae: ParallelSAE, optimizer: torch.optim.Optimizer, dp_group: dist.ProcessGroup | None,
                       dp_size: int, micro_steps: int = 1) -> None:
    """One optimizer step of `sae` from the gradients accumulated over `micro_steps`
    micro-batches on every DP rank (`dp_group` None: one DP rank)."""
    params = [p for p in sae.parameters() if p.grad is not None]
    if params:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        if micro_steps != 1:
            flat /= micro_steps
        if dp_group is not None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=dp_group)
            flat /= dp_size
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
    sae.remove_parallel_gradient()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.normalize_decoder()
