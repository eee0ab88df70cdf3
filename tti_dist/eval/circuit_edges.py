"""Edges of a node circuit: the nonzero block weights whose two ends the circuit keeps.

Gao et al. 2025 ("Weight-sparse transformers have interpretable circuits", arXiv:2511.13653)
count a circuit's size in edges as well as nodes: the nonzero weights between kept nodes.
Pruning nodes of a weight-sparse model removes few weights per node, so its edge count, not
its node count, is where sparsity shows. `tti circuit` prunes nodes
(tti_dist.eval.circuit_masks); this module counts the weights of the blocks' four matrices
that connect what it kept. For dense block i, with

    R_in   channels kept at blocks.i.resid_pre (the block's input),
    R_out  channels kept at blocks.{i+1}.resid_pre (blocks.{L-1}.resid_post after the last),
    H, U   the heads (attn.z) and MLP units (mlp.act) kept,
    W_h    the rows of head h in attn.qkv (its q, k and v), or columns in attn.proj,

a weight counts when it is nonzero and both of its ends are live:

    attn.qkv  [h rows, c]   h in H and c in R_in
    attn.proj [c, h cols]   h in H and c in R_out or read by a kept unit (fc1[u, c] != 0, u in U)
    mlp.fc1   [u, c]        u in U and c in R_in or written by a kept head (proj[c, h cols] != 0, h in H)
    mlp.fc2   [c, u]        u in U and c in R_out

The MLP reads the stream after the attention's write (resid_mid), which has no node of its
own: a channel there carries the circuit when it is kept at the block's input or a kept
head writes it, and a head's write matters when the channel is kept at the block's output
or a kept unit reads it. LayerNorm's mixing across channels is not an edge (as in the
paper's count). A node kind that was not pruned (`--nodes`) counts as all kept. MoE blocks'
experts and the embeddings are not counted (they have no nodes here). Cost: a few boolean
reductions over each matrix, once per circuit.
"""

from __future__ import annotations

import torch
from torch import nn


def _kept(kept: dict[str, list[int]], name: str, size: int) -> torch.Tensor:
    """Bool [size]: the kept nodes of site `name`, or all of them when the site was not pruned."""
    if name not in kept:
        return torch.ones(size, dtype=torch.bool)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[kept[name]] = True
    return mask


@torch.no_grad()
def circuit_edges(model: nn.Module, kept: dict[str, list[int]] | None) -> dict[str, int]:
    """Edges {"attn", "mlp", "all"} of the circuit keeping `kept` (site name -> kept node
    indices, as tti_dist.eval.circuit_masks.prune reports them) in a GPT built at TP=1.
    kept None counts every nonzero weight of the dense blocks' four matrices (the total)."""
    kept = kept or {}
    cfg = model.cfg
    d, heads = cfg.hidden_size, cfg.num_heads
    head_dim = d // heads
    attn_edges = mlp_edges = 0
    for i, block in enumerate(model.blocks):
        r_in = _kept(kept, f"blocks.{i}.resid_pre", d)
        out_site = f"blocks.{i + 1}.resid_pre" if i + 1 < cfg.num_layers else f"blocks.{i}.resid_post"
        r_out = _kept(kept, out_site, d)
        h = _kept(kept, f"blocks.{i}.attn.z", heads)
        qkv = block.attn.qkv.weight.detach().cpu() != 0  # [heads * 3 * head_dim, d], head-major rows
        proj = block.attn.proj.weight.detach().cpu() != 0  # [d, heads * head_dim], head-major columns
        proj_kept = proj[:, h.repeat_interleave(head_dim)]
        if block.mlp is not None:
            units = _kept(kept, f"blocks.{i}.mlp.act", cfg.ffn_size)
            fc1 = block.mlp.fc1.weight.detach().cpu()[units] != 0  # [kept units, d]
            fc2 = block.mlp.fc2.weight.detach().cpu()[:, units] != 0  # [d, kept units]
            read_by_units = fc1.any(dim=0)
            written_by_heads = proj_kept.any(dim=1)
            mlp_edges += int(fc1[:, r_in | written_by_heads].sum()) + int(fc2[r_out].sum())
        else:
            read_by_units = torch.zeros(d, dtype=torch.bool)
        attn_edges += int(qkv[h.repeat_interleave(3 * head_dim)][:, r_in].sum())
        attn_edges += int(proj_kept[r_out | read_by_units].sum())
    return {"attn": attn_edges, "mlp": mlp_edges, "all": attn_edges + mlp_edges}
