"""Tests of the warmup + cosine learning-rate schedule (tti_dist.train.lr_schedule).

For 0-based step s, W warmup steps, S total steps and floor ratio r:
    s < W:  (s + 1) / W
    s >= W: r + (1 - r) * (1 + cos(pi * (s - W) / max(1, S - W - 1))) / 2
"""

from __future__ import annotations

import math

import pytest
import torch

from tti_dist.train.lr_schedule import lr_ratio, warmup_cosine_scheduler

SCHEDULES = [(5, 50, 0.1), (10, 100, 0.0), (1, 20, 0.5), (3, 5, 0.25), (0, 30, 0.1), (7, 9, 0.0)]


def ratios(warmup: int, total: int, floor: float) -> list[float]:
    return [lr_ratio(s, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor) for s in range(total)]


@pytest.mark.parametrize("warmup, total, floor", [s for s in SCHEDULES if s[0] > 0])
def test_warmup_is_linear_from_one_over_w_to_one(warmup, total, floor):
    r = ratios(warmup, total, floor)
    assert r[0] == 1 / warmup
    assert r[warmup - 1] == 1.0
    for s in range(warmup):
        assert r[s] == (s + 1) / warmup


@pytest.mark.parametrize("warmup, total, floor", SCHEDULES)
def test_peak_right_after_warmup_and_floor_at_last_step(warmup, total, floor):
    r = ratios(warmup, total, floor)
    assert r[warmup] == 1.0
    assert r[total - 1] == floor  # exactly, not approximately
    assert min(r) == floor


@pytest.mark.parametrize("warmup, total, floor", SCHEDULES)
def test_monotone_non_increasing_after_warmup(warmup, total, floor):
    r = ratios(warmup, total, floor)
    decay = r[warmup:]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    # Strictly decreasing, in fact: every post-warmup step moves the LR.
    assert all(b < a for a, b in zip(decay, decay[1:]))


def test_cosine_midpoint_and_values():
    # W=10, S=31: p = (s - 10) / 20; the midpoint is s = 20.
    r = ratios(10, 31, 0.2)
    assert r[20] == pytest.approx(0.2 + 0.8 * 0.5, abs=1e-15)
    s = 15
    expected = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 20))
    assert r[s] == pytest.approx(expected, rel=1e-15)


def test_zero_warmup_starts_at_peak():
    r = ratios(0, 10, 0.1)
    assert r[0] == 1.0
    assert r[9] == 0.1
    assert len(set(r)) == 10


def test_steps_past_the_end_stay_at_floor():
    for s in (50, 51, 1000):
        assert lr_ratio(s, warmup_steps=5, total_steps=50, min_lr_ratio=0.1) == 0.1


@pytest.mark.parametrize("warmup, total", [(4, 5), (0, 1)])
def test_floor_at_last_step_with_one_post_warmup_step(warmup, total):
    assert lr_ratio(total - 1, warmup_steps=warmup, total_steps=total, min_lr_ratio=0.1) == 0.1


@pytest.mark.parametrize("warmup, total, floor", [(5, 40, 0.1), (0, 12, 0.3)])
def test_lambda_lr_on_real_optimizer(warmup, total, floor):
    peak = 0.01
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.SGD([param], lr=peak)
    sched = warmup_cosine_scheduler(opt, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor)
    expected = [peak * x for x in ratios(warmup, total, floor)]
    seen = []
    moved = 0.0
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        param.sum().backward()  # gradient 1 everywhere: each update moves the param by -lr
        opt.step()
        sched.step()
        moved += seen[-1]
    assert seen == expected
    assert seen[0] == (peak / warmup if warmup else peak)
    assert seen[-1] == peak * floor
    torch.testing.assert_close(param.detach(), torch.full((3,), -moved, dtype=torch.float64), rtol=1e-12, atol=0)
    # The scheduler's own record of the last LR it set (for step `total`, past the end).
    assert sched.get_last_lr() == [peak * floor]
