"""Mixture-of-experts MLP on DeepSpeed's MoE layer, with its routing exposed as hookpoints.

    x -> router logits l = W_g x (fp32) -> top-k experts per token (capacity-limited)
      -> all-to-all to the experts' ranks -> expert MLPs -> all-to-all back
      -> sum_r gate_r * expert_r(x)

The layer is `deepspeed.moe.layer.MoE` (Megatron's MoE does not run under DeepSpeed ZeRO;
DeepSpeed's does, at stages 0-2). Three things are ours:

- `ExpertMLP`: each expert is a tensor-parallel MLP (megatron-core column-/row-parallel
  linears, like the dense `ParallelMLP`), so an expert's hidden units are split across the
  TP group and DeepSpeed runs in its expert-tensor-parallel mode. Expert weights are drawn
  from a seed per (layer, global expert id): the same at every TP and EP degree.
- `LegibleGate`: DeepSpeed's `TopKGate` whose forward also hands the router logits, the
  router probabilities and each token's experts to the hookpoints it is called with, so
  routing regularizers and metrics read them through the common capture interface, and
  returns the routing counts of the `moe/*` train metrics next to DeepSpeed's outputs. It calls DeepSpeed's own
  gating functions (top1gating / top2gating / topkgating), so routing, capacity and
  token dropping are DeepSpeed's. One difference: the second expert of top-2 is the
  next-highest logit (no Gumbel sampling: routes stay deterministic and legible).
- `TensorParallelExpertsLayer`: DeepSpeed's MOELayer forward for TP-sharded experts
  without its TP split/re-gather of the capacity buffer (see its docstring).
- Process groups: the layer receives its expert-parallel groups (`ExpertGroups`, created
  by `init_parallel` in tti_dist.distributed.expert_parallel; docs/moe.md has the layout);
  the model creates none.

Hookpoints (module `blocks.{i}.moe`): `router_logits`, `router_probs` ([B, T, E], fp32,
replicated across TP), `expert` (int64 [B, T, k]: expert of each route, first choice first,
-1 where the capacity limit dropped the route) and `out` ([B, T, d]).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from tti_dist.capture.hookpoints import HookPoint
from tti_dist.config.schema import ModelConfig
from tti_dist.distributed.expert_parallel import ExpertGroups
from tti_dist.models.activation_sparsity import AbsTopK
from tti_dist.models.parallel_linear import ColumnLinear, RowLinear
from tti_dist.utils.deepspeed_import import import_deepspeed

_EXPERT_SEED_STRIDE = 1_000_003
"""Distance between the init seeds of consecutive global experts of one layer."""


def _normal_init(std: float):
    def init(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def import_deepspeed_moe():
    """deepspeed.moe (imported with the CPU accelerator when no GPU is visible)."""
    import_deepspeed()
    import deepspeed.moe.layer  # lazy: deepspeed is imported only when an MoE model is built
    import deepspeed.moe.sharded_moe

    return deepspeed.moe


def _empty_extra_state(self) -> torch.Tensor:
    # megatron's linears report `_extra_state = None` (a placeholder for Transformer Engine);
    # DeepSpeed's per-expert checkpoint writer clones every state_dict value of an expert,
    # which fails on None. An empty tensor saves and loads (megatron ignores it on load).
    return torch.empty(0)


class _ExpertColumnParallelLinear(ColumnLinear):
    """ColumnLinear (megatron's ColumnParallelLinear, models/parallel_linear.py) with a tensor (empty) as its extra state."""

    get_extra_state = _empty_extra_state


class _ExpertRowParallelLinear(RowLinear):
    """RowLinear (megatron's RowParallelLinear, models/parallel_linear.py) with a tensor (empty) as its extra state."""

    get_extra_state = _empty_extra_state


class ExpertMLP(nn.Module):
    """One expert: column-parallel fc1 -> activation -> row-parallel fc2, hidden units split
    across the TP group (as in `ParallelMLP`).

    Weights come from `init_seed` alone (the global RNG is left untouched), and megatron's
    CPU initialisation draws the full master weight and keeps this rank's slice, so an
    expert is the same at every TP and EP degree.
    """

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_group, init_seed: int):
        super().__init__()
        self.activation = F.relu if cfg.mlp_activation == "relu" else F.gelu
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.fc1 = _ExpertColumnParallelLinear(
                cfg.hidden_size, cfg.expert_ffn_size, config=mp_config, init_method=_normal_init(cfg.init_std),
                bias=cfg.bias, gather_output=False, tp_group=tp_group,
            )
            self.fc2 = _ExpertRowParallelLinear(
                cfg.expert_ffn_size, cfg.hidden_size, config=mp_config, init_method=_normal_init(out_std),
                bias=cfg.bias, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DeepSpeed hands an expert [ep_size, 1, capacity, d]; megatron's linears expect
        # three dimensions (their backward flattens the first two).
        shape = x.shape
        h, _ = self.fc1(x.reshape(-1, shape[-2], shape[-1]))
        out, _ = self.fc2(self.activation(h))
        return out.reshape(shape)


def _make_gate_class():
    """LegibleGate, defined once deepspeed is importable (it subclasses DeepSpeed's gate)."""
    moe = import_deepspeed_moe()
    sharded = moe.sharded_moe

    class LegibleGate(sharded.TopKGate):
        """DeepSpeed's TopKGate, reporting its routing to the parent layer's hookpoints."""

        def __init__(self, model_dim: int, num_experts: int, k: int, capacity_factor: float,
                     eval_capacity_factor: float, min_capacity: int, drop_tokens: bool):
            super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                             noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=True, ep_group=None,
                             top2_2nd_expert_sampling=False)

        def _set_ep_group(self, ep_group):
            # DeepSpeed's engine sets the group again at initialize; the same group is fine.
            if self.ep_group is not None and self.ep_group is not ep_group:
                raise RuntimeError("the gate's expert-parallel group is already set to a different group")
            self.ep_group = ep_group

        def forward(self, input: torch.Tensor, token_shape: tuple[int, int],
                    hooks: tuple[HookPoint, HookPoint, HookPoint]):
            """DeepSpeed's gating outputs (l_aux, capacity, num_experts, indices, locations,
            gates, exp_counts; sparse routes) for tokens [B*T, d], and detached routing
            counts. `hooks` are the router_logits, router_probs and expert hookpoints (of
            the RoutedMLP, whose names they carry)."""
            logits_hook, probs_hook, expert_hook = hooks
            B, T = token_shape
            used_token = None
            E, k = self.wg.weight.shape[0], self.k
            logits = F.linear(input.float(), self.wg.weight.float())
            logits = logits_hook(logits.view(B, T, E)).reshape(B * T, E)
            probs = probs_hook(F.softmax(logits, dim=-1).view(B, T, E))
            cf = self.capacity_factor if self.training else self.eval_capacity_factor
            if k == 1:
                out = sharded.top1gating(logits, cf, self.min_capacity, used_token, None, self.drop_tokens,
                                         self.use_rts, self.ep_group, sparse_routes=True)
            elif k == 2:
                # Second-expert sampling off: top2gating then leaves its logits untouched
                # (with sampling it adds Gumbel noise in place, into the captured logits).
                out = sharded.top2gating(logits, cf, self.min_capacity, self.drop_tokens, self.ep_group,
                                         False, sparse_routes=True)
            else:
                out = sharded.topkgating(logits, k, cf, self.min_capacity, self.drop_tokens, self.ep_group,
                                         sparse_routes=True)
            l_aux, capacity, num_experts, indices_KS, locations, gates, exp_counts = out
            capacity = int(capacity)
            expert_hook(indices_KS.t().long().reshape(B, T, k))
            with torch.no_grad():
                stats = {
                    # First choice before the capacity limit (DeepSpeed's top-1 `mask1`).
                    "first_choice_counts": torch.bincount(logits.detach().argmax(-1), minlength=E).float(),
                    "dropped_routes": (indices_KS < 0).sum().float(),
                    "routes": torch.tensor(float(indices_KS.numel()), device=logits.device),
                    "entropy_sum": torch.special.entr(probs.detach()).sum(),
                    "tokens": torch.tensor(float(B * T), device=logits.device),
                    "capacity": torch.tensor(float(capacity), device=logits.device),
                }
            return (l_aux, capacity, num_experts, indices_KS, locations, gates, exp_counts), stats

    class TensorParallelExpertsLayer(sharded.MOELayer):
        """DeepSpeed's MOELayer for experts that are themselves tensor-parallel.

        Every TP rank holds the same tokens and routing, and a shard of every local
        expert, so each TP rank sends the whole capacity buffer through the all-to-all of
        its EP group (EP groups never mix TP ranks) and its expert shards see all routed
        tokens; the row-parallel fc2 completes each expert's output over TP. DeepSpeed's
        own forward instead splits the buffer across TP ranks and re-gathers it with a flat
        all_gather_into_tensor, which gloo rejects; this forward is DeepSpeed's without
        those two steps (same dispatch, all-to-all and combine helpers).
        """

        def forward(self, x_BTD: torch.Tensor, hooks: tuple[HookPoint, HookPoint, HookPoint]):
            """(output [B, T, d], the gate's routing counts). Called by RoutedMLP directly:
            DeepSpeed's MoE.forward adds only its residual-MoE option, which is off."""
            B, T, d = x_BTD.shape
            tokens_SD = x_BTD.reshape(-1, d)
            gating, stats = self.gate(tokens_SD, (B, T), hooks)
            self.l_aux, capacity, E, indices, locations, gates, self.exp_counts = gating
            slots = sharded._route_slots(indices, locations, E, capacity)
            dispatched_ECD = sharded._sparse_encode(tokens_SD, slots, E, capacity)
            if self.ep_size > 1:
                dispatched_ECD = sharded._AllToAll.apply(self.ep_group, dispatched_ECD)
            # After the all-to-all: [source EP rank, local expert, capacity, d].
            dispatched = dispatched_ECD.reshape(self.ep_size, self.num_local_experts, -1, d)
            expert_out = self.experts(dispatched).reshape(self.ep_size * self.num_local_experts, -1, d)
            if self.ep_size > 1:
                expert_out = sharded._AllToAll.apply(self.ep_group, expert_out)
            combined = sharded._sparse_decode(expert_out.reshape(E * capacity, d), slots, gates, tokens_SD.shape[0])
            return combined.reshape(x_BTD.shape), stats

    return LegibleGate, TensorParallelExpertsLayer


@functools.cache
def moe_classes():
    """(LegibleGate, TensorParallelExpertsLayer), defined on first use: they subclass
    DeepSpeed's classes, and deepspeed is imported only when an MoE model is built."""
    return _make_gate_class()


class RoutedMLP(nn.Module):
    """The MoE layer of an MoE block: DeepSpeed MoE with TP-sharded experts and legible routing.

    Hookpoints: `router_logits`, `router_probs`, `expert`, `out` (see the module docstring).
    `routing_stats()` returns detached counts of the latest forward for the `moe/*` train metrics.
    """

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_group, layer_index: int,
                 experts: ExpertGroups | None):
        super().__init__()
        if experts is None:
            raise ValueError("an MoE block needs expert-parallel groups: init_parallel(..., ep_size=parallel.ep_size)")
        moe = import_deepspeed_moe()
        ep_size = experts.ep_size
        E, k = cfg.moe_num_experts, cfg.moe_top_k
        self.layer_index = layer_index
        self.num_experts, self.top_k = E, k
        # Registered in data-flow order (list_hookpoints follows module order).
        self.hook_router_logits = HookPoint(E, tp_sharded=False)
        self.hook_router_probs = HookPoint(E, tp_sharded=False)
        self.hook_expert = HookPoint(k, tp_sharded=False)
        # The template expert is replaced below: DeepSpeed deep-copies it, and megatron's
        # layers hold process groups, which do not deep-copy.
        self.layer = moe.layer.MoE(
            hidden_size=cfg.hidden_size, expert=nn.Identity(), num_experts=E, ep_size=ep_size, k=k,
            capacity_factor=cfg.moe_capacity_factor, eval_capacity_factor=cfg.moe_eval_capacity_factor,
            min_capacity=cfg.moe_min_capacity, drop_tokens=cfg.moe_drop_tokens, use_rts=True,
            enable_expert_tensor_parallelism=True, top2_2nd_expert_sampling=False,
        )
        self.out_topk = AbsTopK(cfg, "mlp_out")  # AbsTopK activation sparsity, identity when off
        self.hook_out = HookPoint(cfg.hidden_size, tp_sharded=False)
        gate_cls, layer_cls = moe_classes()
        gate = gate_cls(cfg.hidden_size, E, k, cfg.moe_capacity_factor, cfg.moe_eval_capacity_factor,
                        cfg.moe_min_capacity, cfg.moe_drop_tokens)
        nn.init.normal_(gate.wg.weight, mean=0.0, std=cfg.init_std)
        ds_layer = self.layer.deepspeed_moe
        if self.layer.expert_group_name != experts.name:
            raise RuntimeError(f"DeepSpeed names the groups {self.layer.expert_group_name!r}, not {experts.name!r}")
        inner = layer_cls(gate, ds_layer.experts, ds_layer.ep_group_name, ds_layer.ep_size, ds_layer.num_local_experts)
        # DeepSpeed's engine looks the same group up by name at initialize and sets it again.
        inner._set_ep_group(experts.ep_group)
        self.layer.deepspeed_moe = inner
        # One draw from the global RNG (identical on every rank) seeds this layer's experts.
        base_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        ep_rank = experts.ep_rank
        num_local = E // ep_size
        local_experts = nn.ModuleList(
            ExpertMLP(cfg, mp_config, tp_group, base_seed + _EXPERT_SEED_STRIDE * (ep_rank * num_local + j))
            for j in range(num_local)
        )
        for param in local_experts.parameters():
            # DeepSpeed's marks for expert parameters: reduced over the expert-data-parallel
            # group (not the DP group), in optimizer groups of their own.
            param.allreduce = False
            param.group_name = self.layer.expert_group_name
        inner.experts.deepspeed_experts = local_experts
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = num_local
        self._routing_stats: dict[str, torch.Tensor] | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        hooks = (self.hook_router_logits, self.hook_router_probs, self.hook_expert)
        out, self._routing_stats = self.layer.deepspeed_moe(x_BTD, hooks)
        return self.hook_out(self.out_topk(out))

    def routing_stats(self) -> dict[str, torch.Tensor] | None:
        """Detached counts of the latest forward (None before the first): first_choice_counts
        [E] (tokens whose router argmax is e, before the capacity limit), dropped_routes and
        routes (routes over capacity / all routes), entropy_sum (sum over tokens of the
        routing entropy, nats), tokens, capacity (routes per expert)."""
        return self._routing_stats
