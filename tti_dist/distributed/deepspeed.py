"""The `mpu` object DeepSpeed needs, backed by megatron-core's parallel_state.

DeepSpeed asks an `mpu` for the data-parallel group (to reduce gradients and shard ZeRO
state over it) and the model-parallel group (to count tensor-parallel-sharded parameters
once in the global gradient norm, and to name checkpoint files `mp_rank_XX`).
megatron-core's `parallel_state` module has most of these functions but not all the names
DeepSpeed calls (`get_model_parallel_*`, `get_data_parallel_group_ranks`,
`get_pipe_parallel_*`, `get_slice_parallel_*`), so this adapter maps each one onto
parallel_state. There is no pipeline parallelism: the model-parallel group is the
tensor-parallel group.

Sequence-parallel methods are deliberately absent: DeepSpeed probes them with hasattr and
falls back to its own (size 1) groups.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMpu:
    """DeepSpeed `mpu` interface over megatron-core parallel_state (TP x DP, no PP)."""

    # Tensor parallel == model parallel (no pipeline stages).
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # Slice parallel is DeepSpeed's name for tensor parallel in its pipeline engine.
    def get_slice_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_tensor_model_parallel_group()

    def get_slice_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_slice_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(dist.get_process_group_ranks(ps.get_data_parallel_group()))

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipe_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_pipeline_model_parallel_group()

    def get_pipe_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipe_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()
