"""Hookpoint names of the GPT, derived from its config without building it.

Used to validate regularizer hookpoint globs before any process group starts (building
the model needs megatron's parallel state). A test checks that this list equals the names
`list_hookpoints` finds on a built model.
"""

from __future__ import annotations

from tti_dist.config.schema import ModelConfig

BLOCK_SITES = ("resid_pre", "attn.z", "attn.out", "resid_mid", "mlp.pre", "mlp.act", "mlp.out", "resid_post")
"""Per-block hookpoints, in data-flow order."""
TP_SHARDED_SITES = frozenset({"attn.z", "mlp.pre", "mlp.act"})
"""Sites whose last dimension is split across tensor-parallel ranks."""


def gpt_hookpoint_names(cfg: ModelConfig) -> list[str]:
    """embed, blocks.{i}.<site> for every block and site, final_norm."""
    names = ["embed"]
    for i in range(cfg.num_layers):
        names += [f"blocks.{i}.{site}" for site in BLOCK_SITES]
    names.append("final_norm")
    return names
