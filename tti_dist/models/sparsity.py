"""Architectural sparsity of the MLP hidden activation: a distributed top-k mask and a fixed hard mask.

Top-k (k-sparse) activation. For one token's hidden activation a (global width D, after
GELU) and a key s = a (`by="value"`) or s = |a| (`by="abs"`):

    topk(a)_u = a_u  if u is among the k units with the largest s_u, else 0,

ties broken towards the lower global unit index. This is the k-sparse autoencoder's
activation (Makhzani & Frey 2013, "k-Sparse Autoencoders") and the TopK activation of
sparse autoencoders (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"); it is a
winner-take-all nonlinearity with k winners. The selection is not differentiable: the mask
is a constant of the forward pass, so gradients flow through the kept units only.

Hard mask. A fixed subset of round(density * D) units per layer may ever be active; the
others are zeroed on every token (a static hard sparsity mask, the pruning-style
counterpart of winner-take-all). The subset is a uniform random draw from a private
generator seeded from (seed, layer index): identical at every TP degree, and the global
RNG (and so the model's weights) is left untouched.

Tensor parallelism. Each TP rank holds a contiguous slice of the D units (rank r's local
unit u is global unit r * D_local + u). `topk_mask` selects exactly the units a TP=1 model
selects, ties included, with one all-gather per call (see its docstring).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tti_dist.distributed.collectives import all_gather_single
from tti_dist.utils.seeding import splitmix_seed


def _first_n(key: torch.Tensor, threshold: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mask of the first n units of each row in (key desc, index asc) order.

    `threshold` [..., 1] must be the n-th largest key of the row (any value when n = 0):
    keeps the keys above it plus the first (n - count(> threshold)) keys equal to it, by index.
    """
    gt = key > threshold
    eq = key == threshold
    need = n - gt.sum(dim=-1, keepdim=True)
    return (gt | (eq & (eq.cumsum(dim=-1) <= need))) & (n > 0)


@torch.no_grad()
def topk_mask(
    x: torch.Tensor,
    k: int,
    *,
    by: str = "value",
    tp_group: dist.ProcessGroup | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
) -> torch.Tensor:
    """Boolean mask (shape of x) of the k units of each row with the largest key, over the global width.

    x is this TP rank's contiguous slice [..., D_local] of the last dimension of an activation
    of global width D = tp_size * D_local; every leading index is a row. key = x (`by="value"`)
    or |x| (`by="abs"`). Per row, the mask selects the first k global units in (key desc,
    global index asc) order: exactly the set `topk_mask(concat_over_ranks(x), k)` selects at
    tp_size = 1, ties included, for any k in 1..D (k may exceed D_local). Keys are compared
    in x's dtype (fp32 and bf16 supported); NaN keys are not supported.

    Algorithm (one collective):
      1. Local candidates: with k_l = min(k, D_local), the sorted k_l largest local keys
         (torch.topk values). A rank's first k_l units in (key desc, index asc) order are
         the only ones of its units that can be in the global first k (at most k_l of them
         fit), so these values suffice.
      2. All-gather the candidate values [tp_size, rows, k_l] over `tp_group`.
      3. v* = k-th largest gathered value (= the global k-th largest key). With gt_r, eq_r
         the counts of rank r's candidates > v* and == v*, and remaining = k - sum_r gt_r,
         rank r keeps n_r = gt_r + clamp(remaining - sum_{r' < r} eq_r', 0, eq_r) units: the
         ties at v* go to lower ranks first, i.e. to lower global indices.
      4. Rank r keeps its first n_r local units in (key desc, index asc) order: keys above
         its n_r-th candidate value plus the first units equal to it by index (a cumsum over
         the == mask; no sort of the row).
    At tp_size = 1 the same code runs without the all-gather.

    Communication: one all-gather over `tp_group` of tp_size * rows * k_l values in x's
    dtype, i.e. each rank receives (tp_size - 1) * rows * k_l * itemsize bytes (rows = number
    of tokens); nothing at tp_size = 1.
    Cost: one torch.topk of k_l over the local row, one of k over tp_size * k_l gathered
    values, and a few elementwise passes over x; no full sort.

    Args:
        x: local activation [..., D_local] (fp32 or bf16).
        k: units to keep per row, 1 <= k <= tp_size * D_local.
        by: "value" (largest activations) or "abs" (largest magnitudes).
        tp_group: the tensor-parallel group (required when tp_size > 1).
        tp_size: ranks sharing the last dimension.
        tp_rank: this rank's index in tp_group (its slice starts at tp_rank * D_local).
    """
    if by not in ("value", "abs"):
        raise ValueError(f"topk_mask: by={by!r}; allowed: 'value', 'abs'")
    local = x.shape[-1]
    if not 1 <= k <= tp_size * local:
        raise ValueError(f"topk_mask: k={k} must be in 1..{tp_size * local} (tp_size {tp_size} x width {local})")
    key = x.detach().reshape(-1, local)
    if by == "abs":
        key = key.abs()
    k_local = min(k, local)
    vals = torch.topk(key, k_local, dim=-1, largest=True, sorted=True).values.contiguous()  # [rows, k_l]
    if tp_size == 1:
        # Steps 2-3 reduce to v* = the k-th largest key and n = k on every row.
        n = torch.full((vals.shape[0], 1), k, dtype=torch.long, device=vals.device)
        return _first_n(key, vals[:, -1:], n).view(x.shape)
    if tp_size > 1:
        gathered = torch.empty((tp_size * vals.shape[0], k_local), dtype=vals.dtype, device=vals.device)
        all_gather_single(gathered, vals, group=tp_group)
        gathered = gathered.view(tp_size, vals.shape[0], k_local)
    else:
        gathered = vals.unsqueeze(0)
    rows = gathered.shape[1]
    flat = gathered.permute(1, 0, 2).reshape(rows, tp_size * k_local)
    v_star = torch.topk(flat, k, dim=-1, largest=True, sorted=True).values[:, -1:]  # [rows, 1]
    gt = (gathered > v_star.unsqueeze(0)).sum(dim=-1)  # [tp, rows]
    eq = (gathered == v_star.unsqueeze(0)).sum(dim=-1)
    remaining = k - gt.sum(dim=0)  # [rows]
    eq_before = eq[:tp_rank].sum(dim=0)
    n = gt[tp_rank] + (remaining - eq_before).clamp(min=0).minimum(eq[tp_rank])  # [rows]
    n = n.unsqueeze(-1)
    threshold = vals.gather(-1, (n - 1).clamp(min=0))
    return _first_n(key, threshold, n).view(x.shape)


def hard_mask_units(ffn_size: int, density: float, seed: int, layer_index: int) -> torch.Tensor:
    """The fixed hard mask of one layer: bool [ffn_size], exactly round(density * ffn_size) True.

    The kept units are a uniform random subset (the first round(density * ffn_size) entries
    of a random permutation) from a private torch.Generator seeded with a 64-bit mix of
    (seed, layer_index), so layers get different subsets, every TP degree gets the same
    subset (each rank slices the full mask), and the global RNG is never touched: a model's
    weights are the same with and without the mask. No communication; O(ffn_size) once at
    construction.
    """
    num_kept = round(density * ffn_size)
    if not 0 <= num_kept <= ffn_size:
        raise ValueError(f"hard_mask_units: density {density!r} keeps {num_kept} of {ffn_size} units")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(splitmix_seed(seed, layer_index))
    kept = torch.randperm(ffn_size, generator=generator)[:num_kept]
    mask = torch.zeros(ffn_size, dtype=torch.bool)
    mask[kept] = True
    return mask
