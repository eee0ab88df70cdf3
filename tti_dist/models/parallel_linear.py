"""megatron-core's tensor-parallel linear layers, made traceable by torch.compile.

Two things in megatron-core 0.16.1 split a Dynamo graph; both are removed here without
changing what is computed.

1. `RowParallelLinearWithGroup`. megatron-core 0.16.1's `RowParallelLinear.forward` calls its matmul with `tp_group=None`,
and `linear_with_grad_accumulation_and_async_allreduce` then looks the default group up in
`parallel_state`, calling `warnings.warn(..., DeprecationWarning)` on global rank 0 at every
forward. Dynamo cannot trace `warnings.warn`, so under torch.compile every row-parallel
layer split the graph (10 breaks on a 4-block model), and only on rank 0, so rank 0 ran a
different, more fragmented graph than its peers. Passing the layer's own group removes the
lookup and the warning. The matmul uses the group only for sequence parallelism and the
input-gradient all-reduce, both off in a row-parallel layer here; the output all-reduce
already names `self.tp_group`. So the computation is unchanged.

2. `synchronous_input_grad_allreduce`: the column-parallel layers' asynchronous
input-gradient all-reduce (see its docstring), switched off for compiled training only.
"""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn


class RowParallelLinearWithGroup(RowParallelLinear):
    """`RowParallelLinear` whose matmul receives `self.tp_group` instead of None."""

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
