"""Top-k mask and hard mask at tp_size = 1 against references written here (no process group)."""

from __future__ import annotations

import pytest
import torch

from tti_dist.models.sparsity import hard_mask_units, topk_mask


def reference_topk(x: torch.Tensor, k: int, by: str) -> torch.Tensor:
    """First k units per row in (key desc, index asc) order via a stable descending sort."""
    key = x.abs() if by == "abs" else x
    flat = key.reshape(-1, key.shape[-1])
    idx = torch.sort(flat, dim=-1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.view(x.shape)


def loop_topk(x: torch.Tensor, k: int, by: str) -> torch.Tensor:
    """The same by a python loop over (key desc, index asc) pairs: independent of torch.sort."""
    flat = x.reshape(-1, x.shape[-1]).tolist()
    out = torch.zeros(len(flat), x.shape[-1], dtype=torch.bool)
    for i, row in enumerate(flat):
        keys = [abs(v) if by == "abs" else v for v in row]
        for u in sorted(range(len(row)), key=lambda u: (-keys[u], u))[:k]:
            out[i, u] = True
    return out.view(x.shape)


def tied_input(shape, dtype, seed):
    """Small-integer-valued floats in -3..3 (heavy ties, also between v and -v)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("by", ["value", "abs"])
@pytest.mark.parametrize("k", [1, 7, 24])
def test_topk_mask_matches_references_with_ties(dtype, by, k):
    x = tied_input((3, 5, 24), dtype, seed=k)
    mask = topk_mask(x, k, by=by)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert torch.equal(mask.sum(-1), torch.full((3, 5), k))
    assert torch.equal(mask, reference_topk(x, k, by))
    assert torch.equal(mask, loop_topk(x.float(), k, by))


@pytest.mark.parametrize("by", ["value", "abs"])
def test_topk_mask_continuous_values(by):
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 39, 40):
        assert torch.equal(topk_mask(x, k, by=by), reference_topk(x, k, by)), k


def test_ties_go_to_lower_index():
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0]])
    assert topk_mask(x, 2).tolist() == [[False, True, True, False, False, False]]
    assert topk_mask(x, 3).tolist() == [[False, True, True, False, True, False]]
    assert topk_mask(torch.tensor([[-2.0, 1.0, 2.0]]), 1, by="abs").tolist() == [[True, False, False]]


def test_topk_mask_no_grad_and_bad_arguments():
    x = torch.randn(2, 8, requires_grad=True)
    assert not topk_mask(x, 3).requires_grad
    with pytest.raises(ValueError, match="k=9"):
        topk_mask(x, 9)
    with pytest.raises(ValueError, match="by="):
        topk_mask(x, 2, by="max")


def test_hard_mask_units_count_determinism_layers_and_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m0 = hard_mask_units(128, 0.5, seed=3, layer_index=0)
    m1 = hard_mask_units(128, 0.5, seed=3, layer_index=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert m0.dtype == torch.bool and m0.shape == (128,)
    assert int(m0.sum()) == 64 and int(m1.sum()) == 64
    assert torch.equal(m0, hard_mask_units(128, 0.5, seed=3, layer_index=0))
    assert not torch.equal(m0, m1)
    assert not torch.equal(m0, hard_mask_units(128, 0.5, seed=4, layer_index=0))
    assert int(hard_mask_units(100, 0.3, 0, 2).sum()) == 30
    assert int(hard_mask_units(10, 0.25, 0, 0).sum()) == round(2.5)
    assert bool(hard_mask_units(64, 1.0, 0, 0).all())


def test_hard_mask_units_is_a_uniform_subset():
    # Over many layers each unit is kept with probability density (binomial, 5 sigma).
    counts = torch.stack([hard_mask_units(32, 0.25, seed=0, layer_index=i) for i in range(2000)]).sum(0).float()
    expected, sigma = 2000 * 0.25, (2000 * 0.25 * 0.75) ** 0.5
    assert (counts - expected).abs().max() < 5 * sigma
