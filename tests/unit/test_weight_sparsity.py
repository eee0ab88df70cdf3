"""Weight sparsity (Gao et al. 2025): the AbsTopK weight mask against a brute-force sort, the
density schedule, the matrix selection, and one-line config errors."""

from __future__ import annotations

import pytest
import torch

from tti_dist.config import load_config
from tti_dist.config.weight_sparsity import WeightSparsityConfig
from tti_dist.errors import ConfigError
from tti_dist.models.weight_sparsity import abs_topk_masks, neuron_major, selected_matrices
from tti_dist.regularizers.validation import validate_run_config


def brute_force_mask(w: torch.Tensor, parallel: str, k: int, min_per_neuron: int) -> torch.Tensor:
    """Sort every entry by (forced first, |w| desc, neuron-major index asc) and keep the first k."""
    nm = neuron_major(w, parallel)
    neurons, fan = nm.shape
    flat = nm.abs().reshape(-1).tolist()
    forced = set()
    for n in range(neurons):
        best = sorted(range(fan), key=lambda c: (-flat[n * fan + c], c))[:min_per_neuron]
        forced |= {n * fan + c for c in best}
    order = sorted(range(neurons * fan), key=lambda i: (i not in forced, -flat[i], i))
    keep = torch.zeros(neurons * fan, dtype=torch.bool)
    keep[order[:k]] = True
    return neuron_major(keep.view(neurons, fan), parallel)


def test_mask_equals_brute_force_sort_with_ties_and_minimum_per_neuron():
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        out_f, in_f = torch.randint(1, 9, (2,), generator=g).tolist()
        if trial % 3:
            w = torch.randint(-3, 4, (out_f, in_f), generator=g).float() * 0.5  # ties, +-v, zeros
        else:
            w = torch.randn(out_f, in_f, generator=g)
        parallel = "column" if trial % 2 else "row"
        neurons, fan = (out_f, in_f) if parallel == "column" else (in_f, out_f)
        j = int(torch.randint(0, fan + 1, (1,), generator=g)) if trial % 4 == 0 else 0
        k = int(torch.randint(max(1, j * neurons), out_f * in_f + 1, (1,), generator=g))
        got = abs_topk_masks([w], [parallel], [k], min_per_neuron=j)[0]
        assert got.shape == w.shape and int(got.sum()) == k
        assert torch.equal(got, brute_force_mask(w, parallel, k, j)), (trial, parallel, k, j)


def test_mask_keeps_the_largest_magnitudes_across_float_exponents():
    # Magnitudes spread over many binades exercise every byte of the radix select.
    w = torch.tensor([[1e-30, -3e5, 2.5, -2.5], [7e-8, 0.0, -1e-3, 6e10]])
    mask = abs_topk_masks([w], ["column"], [3])[0]
    assert mask.tolist() == [[False, True, True, False], [False, False, False, True]]


def test_density_schedule_is_linear_then_flat():
    ws = WeightSparsityConfig(density=0.25, anneal_fraction=0.5)
    assert ws.density_at(0, 100) == 1.0
    assert ws.density_at(25, 100) == pytest.approx(0.625)
    assert ws.density_at(50, 100) == pytest.approx(0.25)
    assert ws.density_at(99, 100) == pytest.approx(0.25)
    assert WeightSparsityConfig(density=0.1, anneal_fraction=0.0).density_at(1, 100) == pytest.approx(0.1)


def _cfg(*overrides: str):
    return load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", *overrides])


def test_selected_matrices_and_kept_counts():
    cfg = _cfg("weight_sparsity={density: 0.25, min_per_neuron: 2, matrices: ['blocks.1.mlp.*', 'blocks.0.attn.qkv']}")
    chosen = selected_matrices(cfg.model, cfg.weight_sparsity)
    assert [(m.name, m.parallel, m.shape) for m in chosen] == [
        ("blocks.0.attn.qkv", "column", (96, 32)), ("blocks.1.mlp.fc1", "column", (128, 32)),
        ("blocks.1.mlp.fc2", "row", (32, 128))]
    assert [m.kept(0.25, 2) for m in chosen] == [768, 1024, 1024]
    assert chosen[2].neurons == 128  # fc2's neurons are the MLP units (its columns)


@pytest.mark.parametrize("override, message", [
    ("weight_sparsity={density: 0}", "weight_sparsity.density: 0.0 must be a number in (0, 1]"),
    ("weight_sparsity={anneal_fraction: 1.5}", "weight_sparsity.anneal_fraction: 1.5 must be a number in [0, 1]"),
    ("weight_sparsity={min_per_neuron: -1}", "weight_sparsity.min_per_neuron: -1 must be an integer >= 0"),
    ("weight_sparsity={matrices: ['blocks.*.mlp.fc3']}", "weight_sparsity.matrices[0]: 'blocks.*.mlp.fc3' selects no"),
    ("weight_sparsity={density: 0.01, min_per_neuron: 4}", "weight_sparsity.min_per_neuron: 4 x 96 neurons of "
                                                           "blocks.0.attn.qkv"),
])
def test_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        validate_run_config(_cfg(override))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_zero3_and_unsparsifiable_matrices_are_refused():
    with pytest.raises(ConfigError, match=r"^zero.stage: 3 is not supported with weight_sparsity"):
        validate_run_config(_cfg("weight_sparsity={}", "zero.stage=3"))
    moe = ["model.moe_num_experts=2", "parallel.ep_size=1", "weight_sparsity={matrices: ['blocks.*.moe.*']}"]
    with pytest.raises(ConfigError, match=r"^weight_sparsity.matrices\[0\]: 'blocks.\*.moe.\*' selects blocks"):
        validate_run_config(_cfg(*moe))
