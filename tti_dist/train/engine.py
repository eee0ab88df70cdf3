"""Wrap a model in a DeepSpeed engine for the configured ZeRO stage and precision.

Applied by a plain function: the model stays a model. DeepSpeed is imported inside these
functions, in the ranks, never at package import (a Ray driver on a CPU-only head must not
import it, and on CPU the accelerator must be chosen before the import:
tti_dist.utils.deepspeed_import).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tti_dist.config.schema import RunConfig
from tti_dist.distributed.deepspeed import MegatronMpu
from tti_dist.distributed.groups import ParallelGroups
from tti_dist.distributed.zero_config import deepspeed_config, engine_zero_stage
from tti_dist.models.parallel_linear import synchronous_input_grad_allreduce
from tti_dist.train.lr_schedule import warmup_cosine_scheduler
from tti_dist.utils.deepspeed_import import import_deepspeed

logger = logging.getLogger(__name__)


def resolve_bf16(cfg: RunConfig, device: torch.device) -> bool:
    """precision auto -> bf16 on CUDA, fp32 on CPU."""
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (>= 2 dims: linear weights, embeddings); not biases or norm gains."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    import_deepspeed()
    # lazy: deepspeed is imported in the ranks only
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if any(is_moe_param(p) for p in model.parameters()):
        # DeepSpeed reduces expert parameters over their expert-data-parallel group and
        # requires them in optimizer groups of their own (marked moe: True).
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def build_engine(model: nn.Module, cfg: RunConfig, groups: ParallelGroups):
    """deepspeed.initialize with the generated config, our mpu adapter and LR schedule."""
    deepspeed = import_deepspeed()
    bf16 = resolve_bf16(cfg, groups.device)
    ds_config = deepspeed_config(cfg, dp_size=groups.dp_size, bf16=bf16, on_cuda=groups.device.type == "cuda")
    if ds_config["zero_optimization"]["stage"] != cfg.zero.stage and groups.rank == 0:
        logger.info("zero.stage %d over one data-parallel rank shards nothing: DeepSpeed runs stage 0 "
                    "(the same update, without ZeRO's flat-buffer copies)", cfg.zero.stage)
    model = model.to(groups.device)
    if engine_zero_stage(cfg, groups.dp_size) == 3 and getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        # The output layer reads the embedding's weight outside the embedding module's own
        # forward; ZeRO-3 must keep that partitioned parameter gathered for it.
        deepspeed.zero.register_external_parameter(model, model.embedding.weight)

    def scheduler(optimizer):
        return warmup_cosine_scheduler(
            optimizer,
            warmup_steps=cfg.optim.warmup_steps,
            total_steps=cfg.train.steps,
            min_lr_ratio=cfg.optim.min_lr_ratio,
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        lr_scheduler=scheduler,
        mpu=MegatronMpu(),
        config=ds_config,
        dist_init_required=False,
    )
    if groups.dp_size == 1 and engine.zero_optimization_stage() == 0:
        # An all-reduce over one rank is the identity, but DeepSpeed's stage-0 path still
        # flattens every gradient into buckets, reduces and copies them back each step.
        engine.enable_backward_allreduce = False
    if cfg.train.compile:
        synchronous_input_grad_allreduce(engine.module)
        # DeepSpeed's own entry point: nn.Module.compile in place on the wrapped module, so
        # parameter names, checkpoints and hooks stay those of the eager model (a
        # torch.compile wrapper would prefix every name with `_orig_mod.`). Compilation
        # happens at the first forward, after the trainer has registered its hooks.
        engine.compile()
    return engine, ds_config


def global_grad_norm(engine) -> torch.Tensor | float | None:
    """The pre-clipping global gradient norm of the last optimizer step, or None.

    ZeRO stages 1-3 and bf16 record it in the optimizer; plain fp32 data parallelism
    (stage 0) does not, so the trainer computes it before the step with `grad_norm_now`.
    """
    return engine.get_global_grad_norm()


def grad_norm_now(engine, groups: ParallelGroups) -> torch.Tensor:
    """Global L2 norm of the current gradients, TP-replicated parameters counted once.

    The rule of DeepSpeed's (and Megatron's) clip_grad_norm_: TP-sharded parameters
    contribute on every TP rank, replicated ones on TP rank 0 only; the squared sums are
    all-reduced over the model-parallel group by get_global_norm_of_tensors.
    """
    # lazy: deepspeed is imported in the ranks only
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.utils import get_global_norm_of_tensors, is_model_parallel_parameter

    tp_rank = engine.mpu.get_model_parallel_rank()
    grads = [
        p.grad for p in engine.module.parameters()
        if p.grad is not None and not is_moe_param(p) and (tp_rank == 0 or is_model_parallel_parameter(p))
    ]
    norm = get_global_norm_of_tensors(grads, norm_type=2, mpu=engine.mpu)
    experts = [p for p in engine.module.parameters() if p.grad is not None and is_moe_param(p)]
    if not experts:
        return norm
    # Expert parameters: each EP rank holds different experts, each TP rank a different
    # shard of them (all expert weights are TP-sharded or, for fc2's bias, replicated).
    # Their squared norms add over the expert-parallel group and the TP group.
    device = experts[0].grad.device
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for p in experts:
        if tp_rank == 0 or is_model_parallel_parameter(p):
            squares += p.grad.detach().float().pow(2).sum()
    dist.all_reduce(squares, group=engine.mpu.get_model_parallel_group())
    dist.all_reduce(squares, group=groups.experts.ep_group)
    return torch.sqrt(torch.as_tensor(norm, dtype=torch.float32, device=device) ** 2 + squares)
