"""The collectives the package calls by hand, each with the gradient its callers rely on.

Notation: a group of P ranks r = 0..P-1; x_r is rank r's input; on a rank whose loss
part is L_r, g_r = dL_r/dy is the upstream gradient arriving at that rank's output y.
Every function takes its group explicitly (None: the default group) and works on gloo
(CPU) and NCCL alike; the buffers are allocated on the input's device.

Autograd-aware:
- `gather_with_summed_grad`: y = concat(x_0..x_{P-1}) along a dim; dx_r = sum_s g_s[slice r].
- `sum_with_identity_grad`:   y = sum_s x_s;                        dx_r = g_r.
- `sum_with_scaled_grad`:     y = sum_s x_s;                        dx_r = P g_r.
- `copy_with_summed_grad`:    y = x_r;                              dx_r = sum_s g_s.
Not differentiable: `all_gather_concat` (measurements, under no_grad).
The torch-version shim: `all_gather_single`, `reduce_scatter_single`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn);
# older torch (2.11 on the GPU machines) lacks the new names. Same collectives.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithSummedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, dim: int) -> torch.Tensor:
        size = dist.get_world_size(group)
        ctx.group, ctx.size, ctx.dim = group, size, dim
        x = x.contiguous()
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        all_gather_single(out, x, group=group)
        return out if dim == 0 else torch.cat(out.chunk(size, dim=0), dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.dim != 0:
            grad = torch.cat(grad.chunk(ctx.size, dim=ctx.dim), dim=0)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.size, *grad.shape[1:]))
        reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None, None


def gather_with_summed_grad(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """All-gather along `dim` over `group`; backward: reduce-scatter (SUM) of the gradient.

    Forward:  y = concat_dim(x_0, ..., x_{P-1}), the same on every rank (rank order).
    Backward: dx_r = sum_s g_s[slice r], the sum over ranks of the gradient slice that
              belongs to x_r (one reduce-scatter; the x_r must have equal shapes).
    Right when every rank computes a *different* part L_s of a loss L = sum_s L_s from its
    copy of the gathered tensor: then dx_r = dL/dx_r. (megatron's gather_from_tensor_model_
    parallel_region only splits in backward, and its sequence-parallel gather allocates on
    CUDA, so neither fits.) Communication: (P-1)/P of y's bytes received per rank each way.
    """
    dim = dim % x.dim()
    return _GatherWithSummedGrad.apply(x, group, dim)


class _SumWithIdentityGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_with_identity_grad(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (SUM) over `group`; backward: identity.

    Forward:  y = sum_s x_s on every rank.   Backward: dx_r = g_r.
    Right when the loss built on y is the same replicated value on every rank of the group
    (so g_r = g for all r, and dL/dx_r = g exactly). megatron's reduce_from_tensor_model_
    parallel_region computes the same, but all-reduces `x.contiguous()` in place and returns
    `x`, which loses the sum for a non-contiguous x; this reduces a contiguous copy.
    """
    return _SumWithIdentityGrad.apply(x, group)


class _SumWithScaledGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.size = dist.get_world_size(group)
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.size, None


def sum_with_scaled_grad(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (SUM) over `group`; backward: the gradient times the group size P.

    Forward:  y = sum_s x_s on every rank.   Backward: dx_r = P g_r (no communication).
    The exact gradient of the summed objective sum_s L_s is dx_r = sum_s g_s; when the loss
    on y is replicated over the group (g_s = g_r for all s) that sum is P g_r. Used over DP,
    where DeepSpeed then divides parameter gradients by P: the result is the gradient of the
    global-batch loss. Only valid for a replicated upstream gradient.
    """
    return _SumWithScaledGrad.apply(x, group)


class _CopyWithSummedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def copy_with_summed_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; backward: all-reduce (SUM) of the gradient over `group`.

    Forward:  y = x_r (x is replicated over the group).   Backward: dx_r = sum_s g_s.
    For a replicated tensor feeding a computation split over the group (e.g. the input of a
    column-parallel layer): each rank's backward yields only its own split's share of the
    gradient, and the sum is the whole. (megatron's copy_to_tensor_model_parallel_region
    all-reduces `grad.contiguous()` in place and returns `grad`, which loses the sum for a
    non-contiguous gradient; this always returns the reduced tensor.)
    """
    return _CopyWithSummedGrad.apply(x, group)


def all_gather_concat(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's x concatenated along `dim` in rank order, on every rank; no autograd.

    y = concat_dim(x_0, ..., x_{P-1}); the x_r must have equal shapes. For measurements
    (eval, inspect), which run under no_grad.
    """
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)
