"""Expert-parallel process groups for MoE layers, created through DeepSpeed's own registry.

DeepSpeed's MoE layers and its engine look their groups up by name (`ep_size_<N>`) in
module-level dictionaries of `deepspeed.utils.groups`: the engine reduces expert gradients
over the expert-data-parallel group found there, and writes expert checkpoint files per
expert-parallel rank. So the groups must be registered there, and this module is the one
place that does it, with DeepSpeed's own function, before any model or engine exists.

Layout (DeepSpeed's expert-tensor-parallel mode, from megatron-core's TP x DP layout via
the mpu adapter): each DP group of Megatron's rank order is cut into consecutive blocks of
`ep_size` ranks: the expert-parallel (EP) groups, over which tokens are exchanged by
all-to-all. Ranks at the same position of those blocks, within one TP lane, form the
expert-data-parallel (EDP) groups, over which each expert's gradients are averaged.
TP=1 x DP=4, ep_size=2: EP groups {0,1}, {2,3}; EDP groups {0,2}, {1,3}.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch.distributed as dist

from tti_dist.distributed.deepspeed import MegatronMpu
from tti_dist.utils.deepspeed_import import import_deepspeed


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's expert-parallel groups."""

    name: str
    """DeepSpeed's name of the groups (`ep_size_<N>`): MoE layers and expert parameters carry it."""
    ep_group: dist.ProcessGroup
    """Ranks whose experts together make one layer's experts (all-to-all)."""
    ep_rank: int
    """Rank within ep_group: this rank holds global experts [ep_rank * E / ep_size, ...)."""
    ep_size: int
    """Size of ep_group."""
    expert_dp_group: dist.ProcessGroup
    """Ranks holding the same experts (their gradients are averaged over it)."""


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the groups of expert-parallel degree `ep_size` (deepspeed.moe.layer.MoE)."""
    return f"ep_size_{ep_size}"


def create_expert_groups(ep_size: int, dp_rank: int) -> ExpertGroups:
    """Create (or find) the EP and EDP groups of degree `ep_size` in DeepSpeed's registry
    (collective over the world group on first call). `dp_rank` is this rank's position in
    its DP group; the EP rank must be `dp_rank % ep_size` (the layout above), checked."""
    import_deepspeed()
    import deepspeed.comm  # lazy: deepspeed is imported only by ranks that run MoE models
    from deepspeed.utils import groups

    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                        dist_init_required=False, verbose=False)
    if groups.mpu is None:
        groups.mpu = MegatronMpu()
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        # What deepspeed.moe.layer.MoE.set_deepspeed_parallelism does in expert-TP mode.
        groups._create_expert_data_and_model_parallel(ep_size, mpu=groups.mpu)
    ep_group = groups._get_expert_parallel_group(name)
    ep_rank = dist.get_rank(ep_group)
    if ep_rank != dp_rank % ep_size:
        raise RuntimeError(f"expert-parallel rank {ep_rank} differs from the expected {dp_rank % ep_size}: "
                           "DeepSpeed's group layout changed")
    return ExpertGroups(name=name, ep_group=ep_group, ep_rank=ep_rank, ep_size=ep_size,
                        expert_dp_group=groups._get_expert_data_parallel_group(name))


def reset_expert_groups() -> None:
    """Forget DeepSpeed's expert-parallel groups and mpu (when the process groups are torn
    down, e.g. between in-process runs), if deepspeed was imported at all."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        getattr(groups, name).clear()
    groups.mpu = None
    groups.expert_tensor_parallel_world_size = 1
