"""Expert parallelism and tensor parallelism of the MoE GPT, on real gloo ranks.

- EP=2 equals EP=1 holding the same expert weights: two data-parallel ranks, each with
  its own tokens, run one forward/backward with all experts on every rank (EP=1) and
  with the experts split across the two ranks (EP=2). Routing, logits and the dense
  gradients must agree rank by rank; an expert's gradient under EP=2 (which receives the
  tokens of both ranks through the all-to-all) must equal the sum over ranks of its EP=1
  gradients; and EP=2's experts must be exactly the EP=1 experts of the same global id.
- TP=2 equals TP=1: the same model with every expert's hidden units split across two
  ranks gives the same routing, logits and loss, and gradients that are slices of TP=1's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from spawn import run_ranks

pytestmark = pytest.mark.slow

E = 4
EXPERT_KEY = ".layer.deepspeed_moe.experts.deepspeed_experts."


def _model_cfg(top_k: int, capacity_factor: float = 4.0):
    from tti_dist.config.schema import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=32, num_heads=2, max_seq_len=16, vocab_size=64,
                       vocab_pad_multiple=64, moe_num_experts=E, moe_top_k=top_k,
                       moe_capacity_factor=capacity_factor, moe_min_capacity=1)


def _global_key(name: str, ep_rank: int, num_local: int) -> str:
    """Parameter name with the local expert index replaced by the global one."""
    if EXPERT_KEY not in name:
        return name
    head, rest = name.split(EXPERT_KEY)
    local, tail = rest.split(".", 1)
    return f"{head}{EXPERT_KEY}{ep_rank * num_local + int(local)}.{tail}"


def _ep_run(top_k: int, capacity_factor: float) -> dict:
    from tti_dist.capture.hookpoints import ActivationCapture, resolve_hookpoints
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT, lm_loss
    from tti_dist.utils.seeding import seed_runtime, seed_weights

    groups = init_parallel(1, torch.device("cpu"), 120)
    try:
        cfg = _model_cfg(top_k, capacity_factor)
        tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(100 + groups.dp_rank))
        out = {}
        for ep in (1, 2):
            seed_weights(7)
            model = GPT(cfg, groups.with_experts(ep))
            seed_runtime(7, groups.dp_rank)
            hps = resolve_hookpoints(model, ["blocks.*.moe.expert", "blocks.*.moe.router_probs"], "test")
            with ActivationCapture(hps) as cap:
                logits = model(tokens[:, :-1])
                routing = {k: v.detach().clone() for k, v in cap.captured.items()}
            loss = lm_loss(logits, tokens[:, 1:]).mean()
            loss.backward()
            num_local = E // ep
            ep_rank = groups.dp_rank % ep
            grads, weights = {}, {}
            for name, p in model.named_parameters():
                key = _global_key(name, ep_rank, num_local)
                weights[key] = p.detach().clone()
                grads[key] = p.grad.detach().clone()
            out[ep] = {"logits": logits.detach(), "loss": loss.detach(), "routing": routing,
                       "weights": weights, "grads": grads}
        # EP=1: the sum over DP ranks of each expert's gradient (what EP=2 computes in one place).
        summed = {}
        for key, g in out[1]["grads"].items():
            if EXPERT_KEY in key:
                g = g.clone()
                dist.all_reduce(g, group=groups.dp_group)
                summed[key] = g
        out["ep1_summed_expert_grads"] = summed
        return out
    finally:
        shutdown_parallel()


@pytest.mark.parametrize("top_k,capacity_factor", [(1, 4.0), (2, 4.0), (1, 0.5)], ids=["top1", "top2", "top1_drops"])
def test_ep2_equals_ep1(top_k, capacity_factor):
    results = run_ranks(2, _ep_run, top_k, capacity_factor)
    dropped_any = False
    for rank, res in enumerate(results):
        ep1, ep2 = res[1], res[2]
        for name, routes in ep1["routing"].items():
            if name.endswith("expert"):  # the same experts (and the same dropped routes)
                assert torch.equal(ep2["routing"][name], routes), name
                dropped_any |= bool((routes < 0).any())
            else:  # experts see differently composed batches: float rounding may differ
                torch.testing.assert_close(ep2["routing"][name], routes, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ep2["logits"], ep1["logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ep2["loss"], ep1["loss"], rtol=1e-6, atol=0)
        num_experts_here = 0
        for key, g2 in ep2["grads"].items():
            assert torch.equal(ep2["weights"][key], ep1["weights"][key]), key
            if EXPERT_KEY in key:
                num_experts_here += 1
                torch.testing.assert_close(g2, res["ep1_summed_expert_grads"][key], rtol=1e-5, atol=1e-7)
            else:
                torch.testing.assert_close(g2, ep1["grads"][key], rtol=1e-5, atol=1e-7)
        # Each EP=2 rank holds half the experts of each MoE layer (fc1/fc2 weight and bias, 2 layers).
        assert num_experts_here == 2 * (E // 2) * 4
    # Ranks saw different tokens: their experts (different global ids) got different gradients.
    k0 = next(k for k in results[0][2]["grads"] if EXPERT_KEY in k)
    k1 = next(k for k in results[1][2]["grads"] if EXPERT_KEY in k)
    assert k0 != k1 and not torch.allclose(results[0][2]["grads"][k0], results[1][2]["grads"][k1])
    assert dropped_any == (capacity_factor < 1.0)


def _tp_run(top_k: int) -> dict:
    from tti_dist.capture.hookpoints import ActivationCapture, resolve_hookpoints
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT, lm_loss, tp_partition_dims
    from tti_dist.utils.seeding import seed_weights

    tp = int(os.environ["WORLD_SIZE"])
    groups = init_parallel(tp, torch.device("cpu"), 120)
    try:
        cfg = _model_cfg(top_k)
        seed_weights(7)
        model = GPT(cfg, groups.with_experts(1))
        tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(5))
        hps = resolve_hookpoints(model, ["blocks.*.moe.*"], "test")
        with ActivationCapture(hps) as cap:
            logits = model(tokens[:, :-1])
            routing = {k: v.detach().clone() for k, v in cap.captured.items()}
        loss = lm_loss(logits, tokens[:, 1:]).mean()
        loss.backward()
        pieces = [torch.empty_like(logits) for _ in range(groups.tp_size)]
        dist.all_gather(pieces, logits.detach().contiguous(), group=groups.tp_group)
        return {"tp_rank": groups.tp_rank, "logits": torch.cat(pieces, -1), "loss": loss.detach(),
                "routing": routing, "layout": tp_partition_dims(model),
                "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters()}}
    finally:
        shutdown_parallel()


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_tp2_equals_tp1(top_k):
    (ref,) = run_ranks(1, _tp_run, top_k)
    shards = run_ranks(2, _tp_run, top_k)
    expert_params = 0
    for res in shards:
        for name, routes in ref["routing"].items():
            torch.testing.assert_close(res["routing"][name], routes, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["loss"], ref["loss"], rtol=1e-5, atol=0)
        for name, g in res["grads"].items():
            dim = res["layout"][name]
            full = ref["grads"][name]
            if dim is not None:
                size = full.shape[dim] // 2
                full = full.narrow(dim, res["tp_rank"] * size, size)
                expert_params += EXPERT_KEY in name
            torch.testing.assert_close(g, full, rtol=1e-4, atol=1e-6, msg=name)
    # Expert fc1 weight+bias and fc2 weight are TP-sharded: 3 per expert, 4 experts, 2 layers, 2 ranks.
    assert expert_params == 3 * E * 2 * 2
