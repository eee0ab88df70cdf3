"""The weight-sparsity mask (Gao et al. 2025) under TP, on real gloo ranks.

`abs_topk_masks` on TP=2 shards keeps exactly the TP=1 mask of the whole matrix, ties and
min_per_neuron included, for column- and row-parallel matrices, one at a time and batched.
Training with weight sparsity (ZeRO-1 at TP=2 with resume, ZeRO-2 at DP=2: exact density
in the logged metrics and in the fp32 master weights) is in tests/distributed/test_training.py,
which shares its runs and dataset.
"""

from __future__ import annotations

import torch

from spawn import run_ranks


def _matrices(seed: int) -> list[tuple[torch.Tensor, str, int, int]]:
    """(whole matrix, parallel, k, min_per_neuron): integer-valued (many ties) and normal entries."""
    g = torch.Generator().manual_seed(seed)
    ties = torch.randint(-4, 5, (12, 10), generator=g).float()
    normal = torch.randn(10, 12, generator=g)
    return [(ties, "column", 37, 0), (ties, "row", 60, 3), (normal, "column", 29, 2), (normal, "row", 119, 0),
            (ties.t().contiguous(), "column", 120, 0)]


def _mask_rank(seed: int):
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.weight_sparsity import abs_topk_masks

    groups = init_parallel(2, torch.device("cpu"), 60)
    try:
        cases = _matrices(seed)
        shards = [w.chunk(2, dim=0 if par == "column" else 1)[groups.tp_rank] for w, par, _, _ in cases]
        out = []
        for (w, par, k, j), shard in zip(cases, shards):  # one call per min_per_neuron value
            out.append(abs_topk_masks([shard], [par], [k], min_per_neuron=j, tp_group=groups.tp_group, tp_size=2,
                                      tp_rank=groups.tp_rank)[0])
        batched = abs_topk_masks([s for s, c in zip(shards, cases) if c[3] == 0],
                                 [c[1] for c in cases if c[3] == 0], [c[2] for c in cases if c[3] == 0],
                                 tp_group=groups.tp_group, tp_size=2, tp_rank=groups.tp_rank)
        return out, batched
    finally:
        shutdown_parallel()


def test_mask_tp2_equals_tp1_ties_included():
    from tti_dist.models.weight_sparsity import abs_topk_masks

    ranks = run_ranks(2, _mask_rank, 3)
    cases = _matrices(3)
    plain = [c for c in cases if c[3] == 0]
    for i, (w, par, k, j) in enumerate(cases):
        ref = abs_topk_masks([w], [par], [k], min_per_neuron=j)[0]
        got = torch.cat([ranks[r][0][i] for r in range(2)], dim=0 if par == "column" else 1)
        assert int(ref.sum()) == k and torch.equal(got, ref), (i, par, k, j)
    for i, (w, par, k, _) in enumerate(plain):
        ref = abs_topk_masks([w], [par], [k])[0]
        got = torch.cat([ranks[r][1][i] for r in range(2)], dim=0 if par == "column" else 1)
        assert torch.equal(got, ref), i
