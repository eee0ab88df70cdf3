"""KL divergence of the stochastic bottleneck's posterior to the N(0, I) prior (VAE / beta-VAE)."""

from __future__ import annotations

import torch
from torch import nn

from tti_dist.capture.hookpoints import HookPointInfo, resolve_hookpoints, summarize_names
from tti_dist.config.regularizers import KLConfig
from tti_dist.config.schema import ModelConfig
from tti_dist.distributed.collectives import sum_with_identity_grad
from tti_dist.errors import ConfigError
from tti_dist.models.layout import gpt_hookpoint_names, is_bottleneck_latent
from tti_dist.regularizers.base import Regularizer, register

ACTIVE_KL_THRESHOLD = 0.01
"""A latent is active when its KL (nats, mean over the micro-batch's tokens) exceeds this."""


def check_bottleneck_hookpoints(type_name: str, model_cfg: ModelConfig, hookpoints: list[str], where: str) -> None:
    """ConfigError unless every matched hookpoint is a bottleneck latent blocks.{i}.bottleneck.z."""
    allowed = [n for n in gpt_hookpoint_names(model_cfg) if is_bottleneck_latent(n)]
    listing = summarize_names(allowed) if allowed else "none (model.bottleneck_layer is null)"
    for name in hookpoints:
        if not is_bottleneck_latent(name):
            raise ConfigError(f"{where}.hookpoints: {name!r} is not a bottleneck latent; {type_name!r} reads "
                              f"blocks.<i>.bottleneck.z only; allowed: {listing}")


def bottleneck_captures(model: nn.Module, hookpoints: list[HookPointInfo]) -> list[HookPointInfo]:
    """For each blocks.{i}.bottleneck.z: its mu and logvar siblings, then z itself."""
    out: list[HookPointInfo] = []
    for hp in hookpoints:
        prefix = hp.name.rsplit(".", 1)[0]
        out += resolve_hookpoints(model, [f"{prefix}.mu", f"{prefix}.logvar"], "captures")
        out.append(hp)
    return out


def sibling_names(z_name: str) -> tuple[str, str]:
    """blocks.{i}.bottleneck.z -> (blocks.{i}.bottleneck.mu, blocks.{i}.bottleneck.logvar)."""
    prefix = z_name.rsplit(".", 1)[0]
    return f"{prefix}.mu", f"{prefix}.logvar"


@register
class KLDivergence(Regularizer):
    """KL(q(z|x) || N(0, I)) of the bottleneck's Gaussian posterior, mean over tokens.

    With q(z|x_t) = N(mu_t, diag exp(logvar_t)) (hookpoints blocks.{i}.bottleneck.mu/logvar,
    read next to the configured blocks.{i}.bottleneck.z) and N tokens, D latents:

        KL_t = 1/2 sum_d (mu_td^2 + exp(logvar_td) - logvar_td - 1),    loss = (1/N) sum_t KL_t,

    the closed-form prior term of the VAE objective (Kingma & Welling 2014, "Auto-Encoding
    Variational Bayes", appendix B); coefficient > 1 is the beta-VAE (Higgins et al. 2017).
    The loss is the mean over the regularizer's hookpoints. Computed in fp32, autocast off.

    Reduce group: TP. Each rank sums over its D/tp latents; the sum over d is completed with
    `sum_with_identity_grad` (all-reduce forward, identity
    backward: the loss is the same replicated scalar on every TP rank, so each local latent
    receives exactly its TP=1 gradient). DP: a mean over the local batch; DeepSpeed's
    gradient averaging makes the update that of the global-batch mean.
    Communication: one all-reduce of 2 fp32 scalars (loss, active count) per hookpoint per
    micro-step over TP; none over DP. Cost: O(N D / tp) elementwise.

    Metrics: `active_latents` = number of latents whose KL, averaged over this micro-batch's
    tokens, exceeds 0.01 nats (latents the model uses; the others have collapsed to the
    prior), reduced over TP; the trainer averages it over micro-steps and DP ranks.
    """

    Config = KLConfig

    @classmethod
    def check_params(cls, params, model_cfg: ModelConfig, hookpoints: list[str], where: str, tp_size: int) -> None:
        check_bottleneck_hookpoints(cls.Config.type_name, model_cfg, hookpoints, where)

    @property
    def captures(self) -> list[HookPointInfo]:
        """The configured z hookpoints plus their mu and logvar."""
        return bottleneck_captures(self.model, self.hookpoints)

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.groups
        total = None
        active = None
        for hp in self.hookpoints:
            mu_name, lv_name = sibling_names(hp.name)
            mu, logvar = acts[mu_name], acts[lv_name]
            with torch.autocast(device_type=mu.device.type, enabled=False):
                mu = mu.float().reshape(-1, mu.shape[-1])
                logvar = logvar.float().reshape(-1, logvar.shape[-1])
                kl_d = 0.5 * (mu * mu + torch.exp(logvar) - logvar - 1.0).sum(0) / mu.shape[0]  # [D/tp]
                packed = torch.stack([kl_d.sum(), (kl_d.detach() > ACTIVE_KL_THRESHOLD).sum().float()])
                if hp.tp_sharded and g.tp_size > 1:
                    packed = sum_with_identity_grad(packed, g.tp_group)
            total = packed[0] if total is None else total + packed[0]
            active = packed[1] if active is None else active + packed[1]
        n = len(self.hookpoints)
        return total / n, {"active_latents": active.detach() / n}
