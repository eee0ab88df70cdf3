"""The DeepSpeed JSON, generated from the typed config (never written by hand).

One source for batch sizes, precision, clipping and the optimizer: the trainer passes this
dict to `deepspeed.initialize`, and `tti train` saves it as RUN/deepspeed_config.json for
inspection. The LR schedule is not in it: it is a torch LambdaLR built from the same
config (tti_dist.train.lr_schedule), handed to DeepSpeed, which steps it and saves it in
checkpoints.
"""

from __future__ import annotations

from typing import Any

from tti_dist.config.schema import RunConfig


def engine_zero_stage(cfg: RunConfig, dp_size: int | None = None) -> int:
    """The ZeRO stage the DeepSpeed engine runs: `zero.stage`, except that stages 1 and 2
    over a single data-parallel rank run as stage 0.

    ZeRO 1/2 shard optimizer states (and gradients) over the data-parallel group; with one
    rank there is nothing to shard, but DeepSpeed still copies every gradient into flat
    buckets, reduces them over the one-rank group, steps a flat fp32 partition and copies
    the parameters back: +15 ms on a 64 ms CPU step of the smoke model, +1.4 s on a 124M
    model's 3.2 s step (docs/performance.md). Stage 0 computes the same update (AdamW on
    the same fp32 values, the same global-norm clipping) without them. ZeRO-3 is kept:
    its parameter partitioning changes how weights are gathered and checkpointed.
    `dp_size` defaults to the config's parallel.dp_size.
    """
    dp = cfg.parallel.dp_size if dp_size is None else dp_size
    return 0 if cfg.zero.stage in (1, 2) and dp == 1 else cfg.zero.stage


def deepspeed_config(cfg: RunConfig, *, dp_size: int, bf16: bool, on_cuda: bool) -> dict[str, Any]:
    """DeepSpeed config dict for this run.

    The optimizer is torch.optim.AdamW (`torch_adam`), fused on CUDA: DeepSpeed's own
    FusedAdam is JIT-compiled with nvcc on first use, which GPU machines without a CUDA
    toolkit cannot do, and torch's fused kernel does the same work. The ZeRO stage is
    `engine_zero_stage` (stage 0 for stages 1 and 2 at dp_size 1).
    """
    t, o, z = cfg.train, cfg.optim, cfg.zero
    stage = engine_zero_stage(cfg, dp_size)
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": z.overlap_comm,
        "reduce_bucket_size": z.reduce_bucket_size,
        "contiguous_gradients": True,
    }
    if stage in (1, 2):
        zero["allgather_bucket_size"] = z.allgather_bucket_size
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_size,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
                "fused": on_cuda,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # A 0 would make DeepSpeed print every step; our own logging reports progress.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
