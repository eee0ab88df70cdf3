"""The MoE GPT on one rank: hookpoints, routing, and the layer's output against a per-token
reference written here (out_t = sum over kept routes of gate * expert(x_t)).

A size-1 gloo process group, megatron's parallel_state and DeepSpeed's expert groups are
set up once for the module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tti_dist.capture import ActivationCapture, list_hookpoints
from tti_dist.models.layout import gpt_hookpoint_names, hookpoint_width, is_tp_sharded
from tti_dist.config.schema import ModelConfig

E = 4


def moe_cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16, vocab_size=64, vocab_pad_multiple=64,
                moe_num_experts=E, moe_min_capacity=1)
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig, groups, seed: int = 0):
    from tti_dist.models.gpt import GPT

    torch.manual_seed(seed)
    return GPT(cfg, groups.with_experts(1))


def tokens(n=3, t=12, seed=1):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def test_moe_hookpoints_match_static_names(groups):
    cfg = moe_cfg(num_layers=4, moe_layer_interval=2, moe_top_k=2)
    model = build(cfg, groups)
    hps = list_hookpoints(model)
    names = [hp.name for hp in hps]
    assert names == gpt_hookpoint_names(cfg)
    assert cfg.moe_blocks == (1, 3)
    assert "blocks.1.moe.router_probs" in names and "blocks.0.mlp.act" in names
    assert not any(n.startswith(("blocks.1.mlp", "blocks.3.mlp", "blocks.0.moe", "blocks.2.moe")) for n in names)
    for hp in hps:
        assert hp.global_dim == hookpoint_width(hp.name, cfg), hp.name
        assert hp.tp_sharded is is_tp_sharded(hp.name), hp.name
    assert hookpoint_width("blocks.1.moe.expert", cfg) == 2


def test_count_parameters_with_moe(groups):
    from tti_dist.models.gpt import count_parameters

    for cfg in (moe_cfg(), moe_cfg(num_layers=3, moe_layer_interval=3, moe_ffn_hidden_size=48, bias=False)):
        model = build(cfg, groups)
        assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_layer_matches_per_token_reference(groups, top_k):
    cfg = moe_cfg(moe_top_k=top_k, moe_capacity_factor=8.0)
    model = build(cfg, groups, seed=top_k)
    model.train()
    layer = model.blocks[0].moe
    experts = layer.layer.deepspeed_moe.experts.deepspeed_experts
    names = [f"blocks.0.moe.{s}" for s in ("router_logits", "router_probs", "expert", "out")]
    hps = [hp for hp in list_hookpoints(model) if hp.name in names] + \
        [hp for hp in list_hookpoints(model) if hp.name == "blocks.0.resid_mid"]
    with torch.no_grad(), ActivationCapture(hps) as cap:
        model(tokens())
        got = dict(cap.captured)
    x = model.blocks[0].ln2(got["blocks.0.resid_mid"])
    logits, probs, routes, out = (got[n] for n in names)
    wg = layer.layer.deepspeed_moe.gate.wg.weight
    torch.testing.assert_close(logits, x @ wg.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, F.softmax(logits, -1), rtol=1e-6, atol=1e-7)
    assert routes.shape == (3, 12, top_k) and routes.dtype == torch.int64
    assert (routes >= 0).all()  # capacity factor 8: nothing dropped
    # Routes are the top-k experts by logit, first choice first.
    assert torch.equal(routes, logits.topk(top_k, dim=-1).indices)
    # Per-token reference: top-1 scales by the chosen expert's probability (Switch);
    # top-k > 1 renormalises the k probabilities to sum to 1 (GShard).
    chosen = probs.gather(-1, routes)
    gates = chosen if top_k == 1 else chosen / chosen.sum(-1, keepdim=True)
    ref = torch.zeros_like(out)
    with torch.no_grad():
        for b in range(3):
            for t in range(12):
                for r in range(top_k):
                    e = int(routes[b, t, r])
                    ref[b, t] += gates[b, t, r] * experts[e](x[b, t].view(1, 1, 1, -1)).view(-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_capacity_drops_routes_and_stats(groups):
    cfg = moe_cfg(moe_capacity_factor=0.25, moe_eval_capacity_factor=0.25)
    model = build(cfg, groups, seed=5)
    hps = [hp for hp in list_hookpoints(model) if hp.name in ("blocks.0.moe.expert", "blocks.0.moe.out")]
    with torch.no_grad(), ActivationCapture(hps) as cap:
        model(tokens(n=4, t=16))
        routes, out = cap.captured["blocks.0.moe.expert"], cap.captured["blocks.0.moe.out"]
    S = 4 * 16
    capacity = max(-(-S * 0.25 // E), 1)
    dropped = routes[..., 0] < 0
    assert dropped.any()
    # No expert takes more than its capacity; a dropped token gets no expert output.
    kept = routes[routes >= 0]
    assert int(torch.bincount(kept, minlength=E).max()) <= capacity
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))
    stats = model.blocks[0].moe.routing_stats()
    assert float(stats["dropped_routes"]) == float(dropped.sum())
    assert float(stats["routes"]) == S and float(stats["tokens"]) == S
    assert float(stats["first_choice_counts"].sum()) == S
    assert float(stats["capacity"]) == capacity


def test_expert_weights_do_not_depend_on_expert_order_of_construction(groups):
    # Experts are drawn from per-(layer, expert) seeds: two experts differ, and building the
    # model twice from the same seed gives the same experts.
    a, b = build(moe_cfg(), groups, seed=3), build(moe_cfg(), groups, seed=3)
    ea = a.blocks[0].moe.layer.deepspeed_moe.experts.deepspeed_experts
    eb = b.blocks[0].moe.layer.deepspeed_moe.experts.deepspeed_experts
    assert torch.equal(ea[1].fc1.weight, eb[1].fc1.weight)
    assert not torch.equal(ea[0].fc1.weight, ea[1].fc1.weight)
    for p in ea.parameters():
        assert p.allreduce is False and p.group_name == "ep_size_1"


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balance_equals_deepspeeds_aux_loss(groups, top_k):
    # At DP=1 the load_balance regularizer is DeepSpeed's l_aux of top1gating / top2gating
    # (E * sum_e f_e P_e with f from the first choices), which the trainer does not add.
    from tti_dist.regularizers import build_regularizers, checked_regularizers

    cfg = moe_cfg(moe_top_k=top_k)
    model = build(cfg, groups, seed=11)
    specs = checked_regularizers([{"type": "load_balance", "name": "lb", "coefficient": 1.0,
                                   "hookpoints": ["blocks.0.moe.router_probs"]}], cfg)
    (reg,) = build_regularizers(specs, model, groups)
    with torch.no_grad(), ActivationCapture(reg.captures) as cap:
        model(tokens(n=4, t=16, seed=2))
        value, _ = reg.loss(cap.captured)
    l_aux = model.blocks[0].moe.layer.deepspeed_moe.l_aux
    torch.testing.assert_close(value, l_aux, rtol=1e-6, atol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_no_token_dropping_sizes_capacity_to_the_busiest_expert(groups, top_k):
    cfg = moe_cfg(moe_top_k=top_k, moe_capacity_factor=0.1, moe_drop_tokens=False)
    model = build(cfg, groups, seed=4)
    hps = [hp for hp in list_hookpoints(model) if hp.name == "blocks.0.moe.expert"]
    with torch.no_grad(), ActivationCapture(hps) as cap:
        model(tokens(n=4, t=16))
        routes = cap.captured["blocks.0.moe.expert"]
    assert (routes >= 0).all()
    stats = model.blocks[0].moe.routing_stats()
    assert float(stats["dropped_routes"]) == 0
    assert float(stats["capacity"]) == float(torch.bincount(routes.reshape(-1), minlength=E).max())


def test_moe_model_receives_its_expert_groups(groups):
    """The model creates no process group: an MoE block needs the expert-parallel groups of
    ParallelGroups (init_parallel(..., ep_size) or groups.with_experts), and uses exactly them."""
    from tti_dist.models.gpt import GPT
    from tti_dist.models.moe import RoutedMLP

    with pytest.raises(ValueError, match="expert-parallel groups"):
        GPT(moe_cfg(), groups)
    with_experts = groups.with_experts(1)
    model = GPT(moe_cfg(), with_experts)
    layers = [m for m in model.modules() if isinstance(m, RoutedMLP)]
    assert layers and all(m.layer.deepspeed_moe.ep_group is with_experts.experts.ep_group for m in layers)
    assert with_experts.experts.name == layers[0].layer.expert_group_name == "ep_size_1"
