"""Routing metrics (tti_dist.metrics.routing) against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from tti_dist.metrics.routing import (
    contingency_counts,
    entropy_nats,
    expert_shares,
    mutual_information,
    normalized_mutual_information,
    routing_agreement,
)


def test_entropy_uniform_and_one_hot():
    E = 8
    probs = torch.stack([torch.full((E,), 1.0 / E), torch.nn.functional.one_hot(torch.tensor(3), E).float()])
    h = entropy_nats(probs.double())
    assert h[0].item() == pytest.approx(math.log(E), abs=1e-12)
    assert h[1].item() == 0.0
    # Leading dims are kept; a two-point distribution gives its closed form.
    p = torch.tensor([[[0.25, 0.75]]], dtype=torch.float64)
    assert entropy_nats(p).shape == (1, 1)
    assert entropy_nats(p).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-12)


def test_contingency_counts_and_negatives():
    a = torch.tensor([0, 0, 1, 2, -1, 2, 1])
    b = torch.tensor([1, 1, 0, 0, 0, -1, 0])
    c = contingency_counts(a, b, 3, 2)
    assert c.dtype == torch.float64
    assert c.tolist() == [[0, 2], [2, 0], [1, 0]]
    with pytest.raises(ValueError):
        contingency_counts(a, b, 2, 2)
    with pytest.raises(ValueError):
        contingency_counts(a, b, 3, 1)
    with pytest.raises(ValueError):
        contingency_counts(a, b[:-1], 3, 2)


def test_product_table_has_zero_information():
    # Independent uniform labels, every combination equally often: a product table.
    a = torch.arange(4).repeat_interleave(6)  # 0 0 0 0 0 0 1 ...
    b = torch.arange(6).repeat(4)  # 0 1 2 3 4 5 0 ...
    c = contingency_counts(a, b, 4, 6)
    assert torch.equal(c, torch.ones(4, 6, dtype=torch.float64))
    assert mutual_information(c) == 0.0
    assert normalized_mutual_information(c) == 0.0
    # A non-uniform product table (outer product of integer marginals) too.
    prod = torch.outer(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([3.0, 1.0])).double()
    assert mutual_information(prod) == 0.0


def test_identical_and_permuted_labels():
    K = 5
    a = torch.arange(K).repeat(7)
    c = contingency_counts(a, a, K, K)
    assert mutual_information(c) == pytest.approx(math.log(K), abs=1e-12)
    assert normalized_mutual_information(c) == pytest.approx(1.0, abs=1e-12)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert normalized_mutual_information(contingency_counts(a, perm[a], K, K)) == pytest.approx(1.0, abs=1e-12)
    # B a function of A but coarser: I = H(B), NMI = 2 H(B) / (H(A) + H(B)).
    coarse = a % 2
    c = contingency_counts(a, coarse, K, 2)
    p1 = 3 / 5  # share of even labels among 0..4 (each equally often)
    h_b = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
    assert mutual_information(c) == pytest.approx(h_b, abs=1e-12)
    assert normalized_mutual_information(c) == pytest.approx(2 * h_b / (math.log(K) + h_b), abs=1e-12)


def test_hand_computed_2x2():
    # C = [[3, 1], [1, 3]], n = 8: p_ij = 3/8 on the diagonal, 1/8 off it; marginals 1/2.
    c = torch.tensor([[3.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    mi = 2 * (3 / 8) * math.log((3 / 8) / (1 / 4)) + 2 * (1 / 8) * math.log((1 / 8) / (1 / 4))
    assert mi == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert mutual_information(c) == pytest.approx(mi, abs=1e-14)
    assert normalized_mutual_information(c) == pytest.approx(mi / math.log(2), abs=1e-14)


def test_nmi_conventions():
    # Both labelings constant: 1.0 (scikit-learn's convention).
    assert normalized_mutual_information(torch.tensor([[0.0, 0.0], [0.0, 9.0]])) == 1.0
    # Only one labeling constant: I = 0, so 0.
    assert normalized_mutual_information(torch.tensor([[4.0, 0.0], [5.0, 0.0]])) == 0.0
    # Nothing counted (e.g. every route dropped, or the factor never active): nan.
    empty = contingency_counts(torch.tensor([-1, 0]), torch.tensor([2, -1]), 3, 3)
    assert empty.sum() == 0
    assert math.isnan(normalized_mutual_information(empty))
    assert mutual_information(empty) == 0.0


def test_negative_labels_are_ignored():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (200,), generator=gen)
    b = torch.randint(0, 3, (200,), generator=gen)
    drop_a = torch.rand(200, generator=gen) < 0.2
    drop_b = torch.rand(200, generator=gen) < 0.2
    keep = ~(drop_a | drop_b)
    masked = contingency_counts(torch.where(drop_a, -1, a), torch.where(drop_b, -1, b), 4, 3)
    assert torch.equal(masked, contingency_counts(a[keep], b[keep], 4, 3))
    assert masked.sum().item() == keep.sum().item()


def test_routing_agreement():
    prev = torch.tensor([0, 1, 2, 3, -1, 2])
    cur = torch.tensor([0, 1, 3, -1, 1, 2])
    # Routed in both: positions 0, 1, 2, 5; equal at 0, 1, 5.
    assert routing_agreement(prev, cur) == pytest.approx(3 / 4)
    assert routing_agreement(cur, cur) == 1.0
    assert math.isnan(routing_agreement(torch.tensor([-1, 0]), torch.tensor([1, -1])))
    with pytest.raises(ValueError):
        routing_agreement(prev, cur[:-1])


def test_expert_shares():
    first = torch.tensor([[0, 0, 1, -1], [3, 0, 1, 1]])
    shares = expert_shares(first, 4)
    assert shares.tolist() == pytest.approx([3 / 7, 3 / 7, 0.0, 1 / 7])
    assert shares.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        expert_shares(first, 3)
    assert torch.isnan(expert_shares(torch.tensor([-1, -1]), 2)).all()


def test_nmi_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(1)
    for n, ka, kb in [(500, 4, 7), (60, 8, 3), (2000, 2, 2), (300, 16, 40)]:
        a = torch.randint(0, ka, (n,), generator=gen)
        # Correlated labels: b copies a (mod kb) part of the time.
        b = torch.where(torch.rand(n, generator=gen) < 0.5, a % kb, torch.randint(0, kb, (n,), generator=gen))
        ours = normalized_mutual_information(contingency_counts(a, b, ka, kb))
        ref = metrics.normalized_mutual_info_score(a.numpy(), b.numpy())
        assert ours == pytest.approx(ref, abs=1e-10)
        ref_mi = metrics.mutual_info_score(a.numpy(), b.numpy())
        assert mutual_information(contingency_counts(a, b, ka, kb)) == pytest.approx(ref_mi, abs=1e-10)


def test_imbalance_is_that_of_the_global_shares():
    """Two DP ranks whose busiest experts differ: each alone reads 2 x 0.6 = 1.2, but the
    global shares are uniform, imbalance 1 (the mean of per-rank maxima would say 1.2)."""
    from tti_dist.metrics.routing_stats import with_imbalance

    per_rank = [[0.6, 0.4], [0.4, 0.6]]
    reduced = {f"moe/blocks.0/share_e{j}": sum(r[j] for r in per_rank) / 2 for j in range(2)}
    reduced["moe/blocks.0/entropy"] = 0.5
    out = with_imbalance(reduced)
    assert out["moe/blocks.0/imbalance"] == pytest.approx(1.0)
    assert out["moe/blocks.0/entropy"] == 0.5 and "moe/blocks.0/imbalance" not in reduced

    # Uniform routing, E = 8, 8 ranks of 4,096 tokens: the global imbalance is near 1.03,
    # where averaging the ranks' own maxima gives near 1.09.
    gen = torch.Generator().manual_seed(0)
    counts = torch.stack([torch.bincount(torch.randint(0, 8, (4096,), generator=gen), minlength=8) for _ in range(8)])
    shares = counts.double() / 4096
    reduced = {f"moe/blocks.1/share_e{j}": shares[:, j].mean().item() for j in range(8)}
    true = 8 * (counts.sum(0).double() / counts.sum()).max().item()
    per_rank_mean = (8 * shares.max(dim=1).values).mean().item()
    assert with_imbalance(reduced)["moe/blocks.1/imbalance"] == pytest.approx(true, rel=1e-12)
    assert per_rank_mean > true + 0.02
