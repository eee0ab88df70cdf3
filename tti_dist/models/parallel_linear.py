"""megatron-core's tensor-parallel linear layers, with three changes that leave the math alone.

`ColumnLinear` and `RowLinear` subclass megatron-core's `ColumnParallelLinear` and
`RowParallelLinear`: same parameters, initialisation, sharding attributes
(`tensor_model_parallel`, `partition_dim`), checkpoints and state-dict names. What differs:

1. **At TP=1 they are `F.linear`.** With one tensor-parallel rank the layers communicate
   nothing (their copy/reduce regions are identities), yet megatron-core's path still costs,
   per call: an autograd.Function with autocast decorators, configuration checks, the
   region functions, and a bias added out of place after the matmul where `F.linear` fuses
   it (`addmm`). Measured on a 2-core CPU, one [8, 128, 128] -> 512 layer's forward and
   backward took 3.75 ms as ColumnParallelLinear against 2.97 ms as nn.Linear, which made the
   smoke model's step 11% slower than the same model in plain PyTorch (docs/performance.md).
   The fast path is taken only when nothing megatron-specific is on (no sequence
   parallelism, no gradient-accumulation fusion, no deferred embedding wgrad, no explicit
   expert communication, no CPU offloading); then `F.linear(x, W, b)` is exactly the layer's
   function at TP=1.
2. **RowParallelLinear is told its own group.** megatron-core 0.16.1's
   `RowParallelLinear.forward` calls its matmul with `tp_group=None`, and
   `linear_with_grad_accumulation_and_async_allreduce` then looks the default group up,
   calling `warnings.warn(..., DeprecationWarning)` on global rank 0 at every forward. Dynamo
   cannot trace `warnings.warn`, so under torch.compile every row-parallel layer split the
   graph (10 breaks on a 4-block model), on rank 0 only, which then ran a different graph
   from its peers. The matmul uses the group only for sequence parallelism and the
   input-gradient all-reduce, both off in a row-parallel layer; the output all-reduce
   already names `self.tp_group`.
3. `synchronous_input_grad_allreduce`: the column-parallel layers' asynchronous
   input-gradient all-reduce at TP > 1 (untraceable), switched off for compiled training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn


def _is_plain_linear(layer: ColumnParallelLinear | RowParallelLinear) -> bool:
    """Whether the layer, as configured, computes exactly F.linear(x, W, b): one TP rank and
    none of megatron's optional machinery."""
    config = layer.config
    return (
        dist.get_world_size(layer.tp_group) == 1
        and not layer.sequence_parallel
        and not layer.explicit_expert_comm
        and not layer.gradient_accumulation_fusion
        and not config.defer_embedding_wgrad_compute
        and config._cpu_offloading_context is None
    )


class ColumnLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear; `F.linear` when it has one TP rank (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Decided once: a layer's configuration and group do not change after construction.
        self.plain_linear = _is_plain_linear(self)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        if not self.plain_linear:
            return super().forward(input_, weight, runtime_gather_output)
        weight = self.weight if weight is None else weight  # the tied output layer passes one
        if self.skip_bias_add:
            return F.linear(input_, weight), self.bias
        return F.linear(input_, weight, self.bias), None


class RowLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear, told its TP group; `F.linear` when it has one TP rank
    (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Decided once: a layer's configuration and group do not change after construction.
        self.plain_linear = _is_plain_linear(self)

    def forward(self, input_: torch.Tensor):
        if not self.plain_linear:
            return super().forward(input_)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def synchronous_input_grad_allreduce(model: nn.Module) -> int:
    """Make every ColumnParallelLinear all-reduce its input gradient synchronously; returns
    how many layers changed.

    At TP > 1 megatron-core's column-parallel layer issues the input-gradient all-reduce
    with `async_op=True` inside its autograd function's backward, to overlap it with the
    weight-gradient GEMM. Dynamo cannot trace async collectives, so under torch.compile
    every such layer breaks the graph (10 breaks per step on a 2-block model at TP=2).
    With `allreduce_dgrad` off the layer takes megatron's other path for the same sum:
    `copy_to_tensor_model_parallel_region` (identity forward, synchronous all-reduce in
    backward), which Dynamo traces. Only for compiled training: eager keeps the overlap.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear) and module.allreduce_dgrad:
            module.allreduce_dgrad = False
            changed += 1
    return changed
