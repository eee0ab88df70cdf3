"""GPT on megatron-core tensor-parallel layers."""

from tti_dist.models.gpt import GPT, count_parameters, lm_loss, megatron_config, tp_partition_dims

__all__ = ["GPT", "count_parameters", "lm_loss", "megatron_config", "tp_partition_dims"]
