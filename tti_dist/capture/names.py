"""Hookpoint names of the GPT, derived from its config without building it.

Used to validate regularizer hookpoint globs before any process group starts (building
the model needs megatron's parallel state). A test checks that this list equals the names
`list_hookpoints` finds on a built model, and that `hookpoint_width` and `is_tp_sharded`
equal the built hookpoints' global_dim and tp_sharded.
"""

from __future__ import annotations

import re

from tti_dist.config.schema import ModelConfig

BLOCK_SITES = ("resid_pre", "attn.z", "attn.out", "resid_mid", "mlp.pre", "mlp.act", "mlp.out", "resid_post")
"""Per-block hookpoints of a dense block, in data-flow order."""
MOE_SITES = ("moe.router_logits", "moe.router_probs", "moe.expert", "moe.out")
"""Hookpoints of an MoE layer, in data-flow order; in an MoE block they take the place of
the dense MLP's mlp.pre, mlp.act, mlp.out. router_logits and router_probs are
[batch, seq, moe_num_experts] (fp32, replicated across TP), expert is int64
[batch, seq, moe_top_k]: the expert of each route, first choice first, -1 where the route
was dropped by the capacity limit; out is the layer's output."""
MOE_BLOCK_SITES = ("resid_pre", "attn.z", "attn.out", "resid_mid") + MOE_SITES + ("resid_post",)
"""Per-block hookpoints of an MoE block, in data-flow order."""
BOTTLENECK_SITES = ("bottleneck.mu", "bottleneck.logvar", "bottleneck.z", "bottleneck.out")
"""Hookpoints of the stochastic bottleneck (block model.bottleneck_layer only), in data-flow
order; they follow that block's resid_post."""
BOTTLENECK_LATENT_SITES = frozenset({"bottleneck.mu", "bottleneck.logvar", "bottleneck.z"})
"""Bottleneck sites whose width is bottleneck_dim (the latents)."""
TP_SHARDED_SITES = frozenset({"attn.z", "mlp.pre", "mlp.act"}) | BOTTLENECK_LATENT_SITES
"""Sites whose last dimension is split across tensor-parallel ranks."""

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def block_sites(cfg: ModelConfig, layer_index: int) -> tuple[str, ...]:
    """The sites of block `layer_index`, in data-flow order."""
    sites = MOE_BLOCK_SITES if cfg.is_moe_block(layer_index) else BLOCK_SITES
    return sites + (BOTTLENECK_SITES if cfg.bottleneck_layer == layer_index else ())


def gpt_hookpoint_names(cfg: ModelConfig) -> list[str]:
    """tokens, embed, blocks.{i}.<site> for every block and site, final_norm."""
    names = ["tokens", "embed"]
    for i in range(cfg.num_layers):
        names += [f"blocks.{i}.{site}" for site in block_sites(cfg, i)]
    names.append("final_norm")
    return names


def split_name(name: str) -> tuple[int | None, str]:
    """'blocks.3.mlp.act' -> (3, 'mlp.act'); 'embed' -> (None, 'embed')."""
    m = _BLOCK_NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def hookpoint_width(name: str, cfg: ModelConfig) -> int:
    """Global (unsharded) last-dimension size of hookpoint `name` of the GPT built from `cfg`."""
    _, site = split_name(name)
    if site == "tokens":
        return 1
    if site in ("mlp.pre", "mlp.act"):
        return cfg.ffn_size
    if site in ("moe.router_logits", "moe.router_probs"):
        return cfg.moe_num_experts
    if site == "moe.expert":
        return cfg.moe_top_k
    if site in BOTTLENECK_LATENT_SITES:
        return cfg.bottleneck_dim
    return cfg.hidden_size


def is_tp_sharded(name: str) -> bool:
    """Whether hookpoint `name`'s last dimension is split across tensor-parallel ranks."""
    return split_name(name)[1] in TP_SHARDED_SITES


def is_moe_site(name: str, site: str) -> bool:
    """True for blocks.{i}.<site> with `site` one of MOE_SITES (e.g. 'moe.router_probs')."""
    index, found = split_name(name)
    return index is not None and found == site


def is_bottleneck_latent(name: str) -> bool:
    """True for blocks.{i}.bottleneck.z (the sampled latents the kl / total_correlation
    regularizers read)."""
    index, site = split_name(name)
    return index is not None and site == "bottleneck.z"
