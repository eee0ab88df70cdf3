"""A CPU rank's intra-op threads: the machine's cores split between the local ranks, unless
the user set OMP_NUM_THREADS (two runs sharing a machine, Ray's per-worker setting)."""

from __future__ import annotations

import os

import pytest
import torch

from tti_dist.runtime.session import set_cpu_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cores_split_between_local_ranks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    set_cpu_threads(torch.device("cpu"))
    assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3)])
def test_explicit_omp_num_threads_wins(monkeypatch, value, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    set_cpu_threads(torch.device("cpu"))
    assert torch.get_num_threads() == expected


def test_unusable_omp_num_threads_is_ignored(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    set_cpu_threads(torch.device("cpu"))
    assert torch.get_num_threads() == max(1, os.cpu_count() or 1)
