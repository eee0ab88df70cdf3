"""Weight-sparse training: apply the AbsTopK weight mask after every optimizer step, to the
model's weights and to the optimizer's fp32 master copy (Gao et al. 2025).

    after optimizer step s:  d_s  = 1 - (1 - density) min(1, s / (anneal_fraction steps))
                             M    = AbsTopK_{floor(d_s numel)}(W)   (min_per_neuron per neuron)
                             W   <- W * M          (the module's weight: every DP rank, its TP shard)
                             W32 <- W32 * M        (the optimizer's master weight: this rank's part)

The mask and its TP-exact selection are in tti_dist.models.weight_sparsity. Masking only the
module's weight would not last: ZeRO-1/2 (and DeepSpeed's bf16 optimizer) keep a separate
fp32 master partition of every parameter, update it, and copy it back into the weights at the
next step, so pruned weights would come back. Every parameter under those optimizers carries
DeepSpeed's `_hp_mapping` (tensor_fragment: which slice of the flat parameter this DP rank's
master partition holds); the mask's matching slice multiplies that fragment in place. The
ranks of a DP group compute the same mask (their weights are identical after the step), so
no DP communication is needed. Without `_hp_mapping` (plain fp32 at ZeRO stage 0) the
module's weight is the optimizer's parameter itself.

Adam's moments of pruned entries are kept, as in the reference code (openai/circuit_sparsity
train.py applies its top-k to the parameters only): a pruned weight keeps receiving updates
and comes back when its magnitude re-enters the top k. The mask is a function of the weights
and the step alone, so checkpoints need no extra state and a resumed run continues exactly.

DeepSpeed's own pruning (deepspeed.compression, sparse_pruning) masks weights in the forward
pass of replaced modules and ranks each TP shard on its own; it neither prunes the master
weights nor gives the TP=1 selection, so the mask is applied here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tti_dist.config.schema import RunConfig
from tti_dist.distributed.groups import ParallelGroups
from tti_dist.models.weight_sparsity import SparseMatrix, abs_topk_masks, selected_matrices


class WeightSparsifier:
    """Masks the selected matrices of a DeepSpeed engine's module after each optimizer step."""

    def __init__(self, cfg: RunConfig, module: torch.nn.Module, groups: ParallelGroups) -> None:
        if cfg.weight_sparsity is None:
            raise ValueError("WeightSparsifier: the config has no weight_sparsity section")
        self.ws = cfg.weight_sparsity
        self.total_steps = cfg.train.steps
        self.groups = groups
        self.matrices: list[SparseMatrix] = selected_matrices(cfg.model, self.ws)
        modules = dict(module.named_modules())
        self.params = [modules[m.name].weight for m in self.matrices]
        self.density = 1.0
        """The kept fraction applied at the last `apply` (1.0 before the first)."""

    def _tp(self) -> dict:
        g = self.groups
        return dict(tp_group=g.tp_group if g.tp_size > 1 else None, tp_size=g.tp_size, tp_rank=g.tp_rank)

    @torch.no_grad()
    def apply(self, step: int) -> None:
        """Mask the weights (and their master copies) for the density scheduled after `step`."""
        self.density = self.ws.density_at(step, self.total_steps)
        ks = [m.kept(self.density, self.ws.min_per_neuron) for m in self.matrices]
        masks = abs_topk_masks([p.data for p in self.params], [m.parallel for m in self.matrices], ks,
                               min_per_neuron=self.ws.min_per_neuron, **self._tp())
        for param, mask in zip(self.params, masks):
            param.data.mul_(mask)
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                address = mapping.lp_fragment_address
                part = mask.reshape(-1).narrow(0, address.start, address.numel)
                mapping.get_hp_fragment().mul_(part.view_as(mapping.get_hp_fragment()))

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """weights/<matrix>/density (nonzeros / elements of the whole matrix) and
        weights/target_density. One all-reduce of [matrices] int64 over TP, one host sync."""
        counts = torch.stack([torch.count_nonzero(p.data) for p in self.params]).to(torch.int64)
        if self.groups.tp_size > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.groups.tp_group)
        values = counts.tolist()
        out = {f"weights/{m.name}/density": n / m.numel for m, n in zip(self.matrices, values)}
        out["weights/target_density"] = self.density
        return out
