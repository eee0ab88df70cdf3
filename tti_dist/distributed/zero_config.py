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


def deepspeed_config(cfg: RunConfig, *, dp_size: int, bf16: bool, on_cuda: bool) -> dict[str, Any]:
    """DeepSpeed config dict for this run.

    The optimizer is torch.optim.AdamW (`torch_adam`), fused on CUDA: DeepSpeed's own
    FusedAdam is JIT-compiled with nvcc on first use, which GPU machines without a CUDA
    toolkit cannot do, and torch's fused kernel does the same work.
    """
    t, o, z = cfg.train, cfg.optim, cfg.zero
    zero: dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "reduce_bucket_size": z.reduce_bucket_size,
        "contiguous_gradients": True,
    }
    if z.stage in (1, 2):
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
