"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def groups():
    """A real size-1 process group and megatron-core parallel state (TP=1) for this module,
    in this process: enough to build the GPT and its tensor-parallel layers."""
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel, single_process_env

    with single_process_env():
        try:
            yield init_parallel(1, torch.device("cpu"), 60)
        finally:
            shutdown_parallel()
