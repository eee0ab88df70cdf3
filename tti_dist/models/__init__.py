"""GPT on megatron-core tensor-parallel layers.

The names below are imported on first use, so that `tti_dist.models.layout` (the model's
layout from its config, used by config validation) can be imported without megatron.
"""

_FROM_GPT = ("GPT", "count_parameters", "lm_loss", "megatron_config", "tp_partition_dims")

__all__ = list(_FROM_GPT)


def __getattr__(name: str):
    if name in _FROM_GPT:
        from tti_dist.models import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module 'tti_dist.models' has no attribute {name!r}")
