"""Process-group setup for one rank: torch.distributed, then megatron-core parallel_state.

The launcher (torch's elastic agent locally, Ray Train on a cluster) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `init_parallel` starts the default group (gloo on
CPU, NCCL on CUDA, with the configured timeout) and builds the tensor- and data-parallel
groups with megatron-core, in Megatron's rank order: the ranks of one TP group are
adjacent (TP=2 x DP=2: TP groups {0,1}, {2,3}; DP groups {0,2}, {1,3}); for MoE models
it also creates the expert-parallel groups (tti_dist.distributed.expert_parallel).
Everything that communicates receives its groups from the `ParallelGroups` returned here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.distributed.distributed_c10d import GroupMember, _set_pg_timeout, _world
from torch.distributed.elastic.utils.distributed import get_free_port

from tti_dist.distributed.expert_parallel import ExpertGroups, create_expert_groups, reset_expert_groups
from tti_dist.utils.environ import environ_set

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the layout, and the groups every collective names explicitly."""

    device: torch.device
    """Where this rank computes."""
    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    tp_group: dist.ProcessGroup
    """Ranks that hold shards of the same layers."""
    tp_rank: int
    """Rank within tp_group."""
    tp_size: int
    """Size of tp_group."""
    dp_group: dist.ProcessGroup
    """Ranks that hold the same shard and see different data."""
    dp_rank: int
    """Rank within dp_group."""
    dp_size: int
    """Size of dp_group."""
    experts: ExpertGroups | None = None
    """Expert-parallel and expert-data-parallel groups (MoE models only; None otherwise)."""

    def with_experts(self, ep_size: int) -> ParallelGroups:
        """These groups plus the expert-parallel groups of degree `ep_size` (collective on
        first use; for building MoE models of several EP degrees in one process group)."""
        return dataclasses.replace(self, experts=create_expert_groups(ep_size, self.dp_rank))

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes TensorBoard, Parquet and the run directory's files."""
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank)


def init_parallel(tp_size: int, device: torch.device, timeout_s: int, ep_size: int | None = None) -> ParallelGroups:
    """Initialise torch.distributed (if needed), megatron-core's TP/DP groups and, when
    `ep_size` is given (MoE models: `parallel.ep_size`), the expert-parallel groups."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    dp_rank = ps.get_data_parallel_rank()
    experts = create_expert_groups(ep_size, dp_rank) if ep_size is not None else None
    enforce_collective_timeout(timeout_s)
    groups = ParallelGroups(
        device=device,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        dp_group=ps.get_data_parallel_group(),
        dp_rank=dp_rank,
        dp_size=ps.get_data_parallel_world_size(),
        experts=experts,
    )
    logger.debug("parallel layout: tp %d/%d, dp %d/%d", groups.tp_rank, groups.tp_size, groups.dp_rank, groups.dp_size)
    return groups


def enforce_collective_timeout(timeout_s: float) -> None:
    """Give every process group this rank belongs to the run's collective timeout.

    `init_process_group(timeout=...)` sets it for the world group only: megatron-core builds
    its TP/DP groups with its own 30-minute default and DeepSpeed its expert-parallel groups
    with torch's (30 minutes on gloo, 10 on NCCL), so a stopped peer would hang a TP
    all-reduce for half an hour whatever train.dist_timeout_s says. Call again after
    creating groups."""
    timeout = datetime.timedelta(seconds=timeout_s)
    for group in list(_world.pg_map):
        if group is not None and group is not GroupMember.NON_GROUP_MEMBER:
            _set_pg_timeout(timeout, group)


def shutdown_parallel() -> None:
    """Tear down megatron-core groups, DeepSpeed's expert-parallel groups and the default
    process group (idempotent)."""
    reset_expert_groups()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_process_env() -> Iterator[None]:
    """The launcher environment of a one-rank job (RANK=0, WORLD_SIZE=1, a free loopback
    port), restored on exit: for a real size-1 process group in-process (single-rank runs,
    benchmarks, tests) without the elastic agent."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(get_free_port())}
    with environ_set(env):
        yield
