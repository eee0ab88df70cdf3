"""Hookpoint names of the GPT, derived from its config without building it.

The definitions live in `tti_dist.models.layout` (the one description of a model's
hookpoints, linear layers and parameters); this module re-exports its hookpoint helpers
under their earlier import path.
"""

from __future__ import annotations

from tti_dist.models.layout import (  # noqa: F401  (re-exported)
    BLOCK_SITES,
    BOTTLENECK_LATENT_SITES,
    BOTTLENECK_SITES,
    MOE_BLOCK_SITES,
    MOE_SITES,
    TP_SHARDED_SITES,
    block_sites,
    gpt_hookpoint_names,
    hookpoint_width,
    is_bottleneck_latent,
    is_moe_site,
    is_tp_sharded,
    split_name,
)
