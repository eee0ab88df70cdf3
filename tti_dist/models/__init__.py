"""GPT on megatron-core tensor-parallel layers.

The package imports nothing itself, so that `tti_dist.models.layout` (the model's layout from
its config, used by config validation) can be imported without megatron; the model is in
`tti_dist.models.gpt`.
"""
