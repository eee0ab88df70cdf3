"""tti_dist.distributed.collectives on 2 gloo ranks: each forward and each backward equals its
docstring's formula. Rank r's input is x_r and its loss part L_r = sum(w_r * y), so the
upstream gradient on rank r is g_r = w_r (distinct per rank)."""

from __future__ import annotations

import torch

from spawn import run_ranks

WORLD = 2


def _x(rank: int, shape=(3, 4)) -> torch.Tensor:
    return torch.arange(12, dtype=torch.float64).reshape(shape) * (rank + 1) + 0.5


def _w(rank: int, shape) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, int(torch.tensor(shape).prod()), dtype=torch.float64).reshape(shape) + 10 * rank


def _rank() -> dict:
    import torch.distributed as dist

    from tti_dist.distributed.collectives import (all_gather_concat, copy_with_summed_grad, gather_with_summed_grad,
                                                  sum_with_identity_grad, sum_with_scaled_grad)

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        out = {}
        for name, fn in (("gather0", lambda x: gather_with_summed_grad(x, None, dim=0)),
                         ("gather1", lambda x: gather_with_summed_grad(x, None, dim=-1)),
                         ("sum_identity", lambda x: sum_with_identity_grad(x, None)),
                         ("sum_scaled", lambda x: sum_with_scaled_grad(x, None)),
                         ("copy", lambda x: copy_with_summed_grad(x, None)),
                         # a transposed (non-contiguous) input and upstream gradient
                         ("copy_t", lambda x: copy_with_summed_grad(x.t(), None).t()),
                         ("sum_identity_t", lambda x: sum_with_identity_grad(x.t(), None).t())):
            x = _x(rank).requires_grad_(True)
            y = fn(x)
            (y * _w(rank, tuple(y.shape))).sum().backward()
            out[name] = (y.detach(), x.grad)
        with torch.no_grad():
            out["concat0"] = all_gather_concat(_x(rank), None, dim=0)
            out["concat1"] = all_gather_concat(_x(rank).t(), None, dim=-1)
        return out
    finally:
        dist.destroy_process_group()


def test_forward_and_backward_formulas() -> None:
    results = run_ranks(WORLD, _rank)
    xs = [_x(r) for r in range(WORLD)]
    for r, res in enumerate(results):
        y, dx = res["gather0"]
        assert torch.equal(y, torch.cat(xs, dim=0))
        assert torch.equal(dx, sum(_w(s, (6, 4))[3 * r:3 * (r + 1)] for s in range(WORLD)))
        y, dx = res["gather1"]
        assert torch.equal(y, torch.cat(xs, dim=1))
        assert torch.equal(dx, sum(_w(s, (3, 8))[:, 4 * r:4 * (r + 1)] for s in range(WORLD)))
        for key in ("sum_identity", "sum_identity_t"):
            y, dx = res[key]
            assert torch.equal(y, sum(xs))
            assert torch.equal(dx, _w(r, (3, 4)))
        y, dx = res["sum_scaled"]
        assert torch.equal(y, sum(xs))
        assert torch.equal(dx, WORLD * _w(r, (3, 4)))
        for key in ("copy", "copy_t"):
            y, dx = res[key]
            assert torch.equal(y, xs[r])
            assert torch.equal(dx, sum(_w(s, (3, 4)) for s in range(WORLD)))
        assert torch.equal(res["concat0"], torch.cat(xs, dim=0))
        assert torch.equal(res["concat1"], torch.cat([x.t() for x in xs], dim=-1))
