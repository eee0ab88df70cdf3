"""Routing regularizers of the MoE layers: load balance, router z-loss, routing entropy and
routing consistency (the same token id routed the same way wherever it occurs).

They read the router's hookpoints blocks.{i}.moe.router_probs / blocks.{i}.moe.router_logits
([batch, seq, moe_num_experts], fp32). The gate weight is replicated across tensor-parallel
ranks and every TP rank routes the same tokens, so these tensors are identical on all TP
ranks: each TP rank computes the same loss and needs no TP reduction; the replicated gate
weight receives the same gradient on each TP rank, equal to the TP=1 one. Over data
parallelism each loss is a mean over the local tokens (DeepSpeed averages gradients over
DP); the statistics that must be global (load balance's routed shares, consistency's
per-token-id mean routes) are all-reduced over the DP group explicitly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tti_dist.capture.hookpoints import HookPointInfo, resolve_hookpoints, summarize_names
from tti_dist.config.regularizers import (
    LoadBalanceConfig,
    RouterZConfig,
    RoutingConsistencyConfig,
    RoutingEntropyConfig,
)
from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.models.layout import gpt_hookpoint_names, is_moe_site
from tti_dist.regularizers.base import Regularizer, register

TOKENS_HOOKPOINT = "tokens"
"""The model's input-id hookpoint ([batch, seq] int64) that routing_consistency keys on."""


def check_router_hookpoints(type_name: str, site: str, model_cfg: ModelConfig, hookpoints: list[str],
                            where: str) -> None:
    """ConfigError unless every matched hookpoint is blocks.{i}.<site> (site e.g. 'moe.router_probs')."""
    allowed = [n for n in gpt_hookpoint_names(model_cfg) if is_moe_site(n, site)]
    listing = summarize_names(allowed) if allowed else "none (model.moe_num_experts is 0)"
    for name in hookpoints:
        if not is_moe_site(name, site):
            raise ConfigError(f"{where}.hookpoints: {name!r} is not a router hookpoint; {type_name!r} reads "
                              f"blocks.<i>.{site} only; allowed: {listing}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., E] -> [N, E] fp32."""
    return x.float().reshape(-1, x.shape[-1])


class _RouterRegularizer(Regularizer):
    """Shared hookpoint check: subclasses set `site`."""

    site: str = "moe.router_probs"

    @classmethod
    def check_params(cls, params, model_cfg: ModelConfig, hookpoints: list[str], where: str, tp_size: int) -> None:
        check_router_hookpoints(cls.Config.type_name, cls.site, model_cfg, hookpoints, where)


@register
class LoadBalance(_RouterRegularizer):
    """Switch Transformer / GShard auxiliary load-balancing loss.

    With E experts, router probabilities p_t (hookpoint blocks.{i}.moe.router_probs) and
    each token's first-choice expert e(t) = argmax_e p_te (before the capacity limit, as
    DeepSpeed's top1gating/top2gating count it for their own l_aux):

        f_e = (1/N_global) #{t in the global batch : e(t) = e}      (not differentiable)
        P_e = (1/N_local) sum_{t local} p_te                         (differentiable)
        loss = E * sum_e f_e P_e,

    mean over the hookpoints. It is 1 when routing is uniform (f = P = 1/E) and grows to E
    when every token goes to one expert with certainty. Source: Fedus, Zoph, Shazeer (2021),
    "Switch Transformers" (differentiable load-balancing loss); Lepikhin et al. (2020),
    "GShard" (l_aux). f is counted globally over the DP group, P locally (below).

    Reduce group: DP. The per-expert first-choice counts of all hookpoints are summed with
    one all-reduce over groups.dp_group (explicit group=); f is the same on every DP rank.
    P stays local: the mean over DP ranks of the local losses is E sum_e f_e mean_r P_e^r,
    the global-batch loss when the local batches are equal, and DeepSpeed's gradient
    averaging over DP gives that loss's gradient. TP: none (router_probs replicated).
    Communication: one all-reduce of num_hookpoints x E fp32 (4 L E bytes) per micro-step
    over DP when dp_size > 1; nothing over TP. Cost: O(N E) (mean, argmax, bincount).

    Metrics: `max_share` = E * max_e f_e, mean over the hookpoints (1: every expert gets
    the same share of first choices; E: one expert takes all), global over DP.
    """

    Config = LoadBalanceConfig
    site = "moe.router_probs"

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.groups
        probs = [_rows(acts[hp.name]) for hp in self.hookpoints]
        with torch.autocast(device_type=probs[0].device.type, enabled=False):
            num_experts = probs[0].shape[-1]
            counts = torch.stack([torch.bincount(p.detach().argmax(-1), minlength=num_experts) for p in probs])
            counts = counts.float()  # [L, E]
            if g.dp_size > 1:
                dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=g.dp_group)
            share = counts / counts.sum(-1, keepdim=True)  # f, [L, E]
            mean_prob = torch.stack([p.mean(0) for p in probs])  # P, [L, E]
            per_layer = num_experts * (share * mean_prob).sum(-1)
        max_share = num_experts * share.max(-1).values.mean()
        return per_layer.mean(), {"max_share": max_share}


@register
class RouterZLoss(_RouterRegularizer):
    """ST-MoE router z-loss: keeps router logits small (numerically stable gating).

    With router logits l_t (hookpoint blocks.{i}.moe.router_logits, E experts) and N tokens:

        loss = (1/N) sum_t (logsumexp_e l_te)^2,

    mean over the hookpoints. Source: Zoph et al. (2022), "ST-MoE: Designing Stable and
    Transferable Sparse Expert Models" (the router z-loss).

    Reduce group: none. A mean over the local tokens; DeepSpeed's gradient averaging over
    DP makes the update that of the global-batch mean. TP: router_logits are replicated.
    Communication: none. Cost: O(N E) (one logsumexp).
    """

    Config = RouterZConfig
    site = "moe.router_logits"

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = [_rows(acts[hp.name]) for hp in self.hookpoints]
        with torch.autocast(device_type=logits[0].device.type, enabled=False):
            per_layer = torch.stack([torch.logsumexp(x, dim=-1).square().mean() for x in logits])
        return per_layer.mean(), {}


@register
class RoutingEntropy(_RouterRegularizer):
    """Routing entropy: the mean entropy of the router distribution; penalising it sharpens
    routes (each token committed to few experts, legible routing).

    With router probabilities p_t (hookpoint blocks.{i}.moe.router_probs) and N tokens:

        H_t = -sum_e p_te log p_te   (0 log 0 = 0),     loss = (1/N) sum_t H_t,

    mean over the hookpoints, in nats (log E for uniform routing, 0 for one-hot). Shannon
    entropy (Shannon 1948) of the gating distribution (the `moe/*/entropy` metric of
    docs/metrics.md#routing-metrics); penalising a predictive distribution's entropy is entropy minimisation
    (Grandvalet & Bengio 2005, "Semi-supervised Learning by Entropy Minimization"), here
    applied to the router. log p is evaluated at max(p, tiny) so that an exactly-zero
    probability contributes 0 with a finite gradient.

    Reduce group: none. A mean over the local tokens; DeepSpeed's gradient averaging over
    DP makes the update that of the global-batch mean. TP: router_probs are replicated.
    Communication: none. Cost: O(N E).
    """

    Config = RoutingEntropyConfig
    site = "moe.router_probs"

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        probs = [_rows(acts[hp.name]) for hp in self.hookpoints]
        with torch.autocast(device_type=probs[0].device.type, enabled=False):
            tiny = torch.finfo(probs[0].dtype).tiny
            per_layer = torch.stack([-(p * torch.log(p.clamp_min(tiny))).sum(-1).mean() for p in probs])
        return per_layer.mean(), {}


@register
class RoutingConsistency(_RouterRegularizer):
    """Routing consistency: occurrences of the same token id should be routed alike.

    With router probabilities p_t (hookpoint blocks.{i}.moe.router_probs, E experts), the
    token ids v(t) (the model's `tokens` hookpoint, captured alongside), V = model.vocab_size
    and the GLOBAL batch's per-token-id mean routing distribution

        pbar_v = sum_{t global: v(t) = v} p_t / #{t global: v(t) = v},

        loss = (1/N_local) sum_{t local} || p_t - pbar_{v(t)} ||^2,

    mean over the hookpoints: the within-token-id variance of the routing (summed over
    experts), 0 when every occurrence of each token id is routed identically. This is the
    token-id routing regularity reported by Xue et al. (2024), "OpenMoE" ("context-independent
    specialization": routing is largely decided by the token id), made a penalty: it is the
    within-class scatter of LDA (Fisher 1936) with token ids as the classes.

    pbar is detached. That loses nothing: for the global loss S = sum_t ||p_t - pbar_v(t)||^2
    the derivative through the group mean vanishes, since sum_{t: v(t)=v} (p_t - pbar_v) = 0,
    so dS/dp_t = 2 (p_t - pbar_v(t)) exactly; hence no backward collective is needed. With
    1/N_local normalisation each DP rank's gradient is 2 (p_t - pbar)/N_local on its own
    tokens, and DeepSpeed's average over dp_size equal local batches gives 2 (p_t - pbar)/N,
    the gradient of the DP=1 loss on the union batch; the DP mean of the losses is its value.
    Token ids must lie in [0, vocab_size) (true of the data; padding rows are never input).

    Reduce group: DP. Per token id sums of p [V, E] for every hookpoint and the counts [V]
    are packed into one all-reduce (SUM) over groups.dp_group (explicit group=); forward
    only. TP: none (router_probs and tokens are replicated).
    Communication: V E floats per matched hookpoint plus V once, fp32, per micro-step over
    DP when dp_size > 1 (4 (L V E + V) bytes; e.g. V = 50257, E = 8, L = 4: 6.6 MB). Cost:
    O(N E) for the sums and deviations, plus L V E memory for the per-id sums.

    Metrics: `consistency` = share of tokens whose first-choice expert argmax_e p_te equals
    argmax_e pbar_{v(t),e} (pbar from the same global reduction), mean over the hookpoints;
    a local share that the trainer's DP mean turns into the global-batch share (equal local
    batches). Token ids seen once count as consistent.
    """

    Config = RoutingConsistencyConfig
    site = "moe.router_probs"

    @property
    def captures(self) -> list[HookPointInfo]:
        """The model's `tokens` hookpoint, then the configured router_probs hookpoints."""
        return resolve_hookpoints(self.model, [TOKENS_HOOKPOINT], "captures") + self.hookpoints

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.groups
        vocab = self.model.cfg.vocab_size
        ids = acts[TOKENS_HOOKPOINT].reshape(-1).long()
        probs = [_rows(acts[hp.name]) for hp in self.hookpoints]
        num_layers = len(probs)
        num_experts = probs[0].shape[-1]
        with torch.autocast(device_type=probs[0].device.type, enabled=False):
            packed = probs[0].new_zeros(num_layers * vocab * num_experts + vocab)
            sums = packed[: num_layers * vocab * num_experts].view(num_layers, vocab, num_experts)
            for j, p in enumerate(probs):
                if p.shape[0] != ids.shape[0]:
                    raise ValueError(f"{self.spec.where}: {self.hookpoints[j].name} has {p.shape[0]} tokens, "
                                     f"the tokens hookpoint {ids.shape[0]}")
                sums[j].index_add_(0, ids, p.detach())
            packed[num_layers * vocab * num_experts:].index_add_(0, ids, torch.ones_like(ids, dtype=packed.dtype))
            if g.dp_size > 1:
                dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=g.dp_group)
            counts = packed[num_layers * vocab * num_experts:]
            mean_route = sums / counts.clamp_min(1.0)[None, :, None]  # pbar, [L, V, E]
            total = None
            agree = None
            for j, p in enumerate(probs):
                target = mean_route[j].index_select(0, ids)  # [N, E]
                dev = (p - target).square().sum(-1).mean()
                same = (p.detach().argmax(-1) == target.argmax(-1)).float().mean()
                total = dev if total is None else total + dev
                agree = same if agree is None else agree + same
        return total / num_layers, {"consistency": agree / num_layers}
