"""MoE routing regularizers on real gloo ranks.

- DP=2 equals DP=1: two data-parallel ranks, each holding half of a fixed batch of router
  logits (and token ids), give losses whose mean is the one-rank loss on the whole batch,
  and per-rank gradients that, averaged over the ranks as DeepSpeed does, are the one-rank
  gradients of the same rows. load_balance (global first-choice shares) and
  routing_consistency (global per-token-id mean routes) reduce over DP to get there.
- TP=2 equals TP=1 on the MoE GPT: the same weights and tokens give the same loss values
  and the same gradient of each layer's (replicated) router weight on both TP ranks; the
  TP=1 values also match a reference computed here from the captured routing.
"""

from __future__ import annotations

import os

import pytest
import torch

from spawn import run_ranks

E = 4
B, T = 4, 6
ENTRIES = [
    {"type": "load_balance", "name": "lb", "coefficient": 1.0, "hookpoints": ["blocks.*.moe.router_probs"]},
    {"type": "router_z", "name": "z", "coefficient": 1.0, "hookpoints": ["blocks.*.moe.router_logits"]},
    {"type": "routing_entropy", "name": "ent", "coefficient": 1.0, "hookpoints": ["blocks.1.moe.router_probs"]},
    {"type": "routing_consistency", "name": "rc", "coefficient": 1.0, "hookpoints": ["blocks.*.moe.router_probs"]},
]
GATES = ["blocks.0.moe.layer.deepspeed_moe.gate.wg.weight", "blocks.1.moe.layer.deepspeed_moe.gate.wg.weight"]


def _model_cfg():
    from tti_dist.config.schema import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=32, num_heads=2, max_seq_len=16, vocab_size=64,
                       vocab_pad_multiple=64, moe_num_experts=E, moe_min_capacity=1)


def _fixed_batch():
    """Router logits of two layers [B, T, E] and token ids [B, T] (ids 0..5: repeated within
    and across the halves). The two halves prefer different experts, so a rank's own
    first-choice shares differ from the global ones."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, B, T, E, generator=g)
    logits[:, : B // 2, :, 0] += 1.5
    logits[:, B // 2:, :, 2] += 1.5
    ids = torch.randint(0, 6, (B, T), generator=g)
    return logits, ids


def _dp_part(model, groups) -> dict:
    """Each DP rank: its rows of the fixed batch; loss, metrics and d loss / d logits."""
    from tti_dist.regularizers import build_regularizers, checked_regularizers

    regs = build_regularizers(checked_regularizers(ENTRIES, model.cfg), model, groups)
    logits_all, ids_all = _fixed_batch()
    rows = slice(groups.dp_rank * B // groups.dp_size, (groups.dp_rank + 1) * B // groups.dp_size)
    out = {}
    for reg in regs:
        logits = [logits_all[j, rows].clone().requires_grad_() for j in range(2)]
        acts = {"tokens": ids_all[rows].clone()}
        for j in range(2):
            acts[f"blocks.{j}.moe.router_logits"] = logits[j]
            acts[f"blocks.{j}.moe.router_probs"] = torch.softmax(logits[j], -1)
        value, metrics = reg.loss(acts)
        grads = torch.autograd.grad(value, logits, allow_unused=True)
        out[reg.spec.name] = {"loss": value.detach(), "metrics": {k: v.detach() for k, v in metrics.items()},
                              "grads": [torch.zeros_like(x) if g is None else g for x, g in zip(logits, grads)]}
    return out


def _tp_part(model, groups) -> dict:
    """Forward fixed tokens through the MoE GPT; per regularizer: loss, metrics, router weight grads."""
    from tti_dist.capture.hookpoints import ActivationCapture
    from tti_dist.regularizers import build_regularizers, checked_regularizers

    regs = build_regularizers(checked_regularizers(ENTRIES, model.cfg, groups.tp_size), model, groups)
    params = dict(model.named_parameters())
    gates = [params[n] for n in GATES]
    tokens = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(5))
    captures = list({hp.name: hp for reg in regs for hp in reg.captures}.values())
    out = {"tp_rank": groups.tp_rank, "regs": {}}
    with ActivationCapture(captures) as cap:
        model(tokens)
        out["captured"] = {k: v.detach().clone() for k, v in cap.captured.items()}
        for reg in regs:
            value, metrics = reg.loss(cap.captured)
            grads = torch.autograd.grad(value, gates, retain_graph=True, allow_unused=True)
            out["regs"][reg.spec.name] = {
                "loss": value.detach(), "metrics": {k: v.detach() for k, v in metrics.items()},
                "grads": [torch.zeros_like(p) if g is None else g for p, g in zip(gates, grads)],
            }
    return out


def _rank(mode: str) -> dict:
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT
    from tti_dist.utils.seeding import seed_weights

    world = int(os.environ["WORLD_SIZE"])
    groups = init_parallel(world if mode == "tp" else 1, torch.device("cpu"), 120, ep_size=1)
    try:
        seed_weights(7)
        model = GPT(_model_cfg(), groups)
        out = {"dp_rank": groups.dp_rank, "dp_size": groups.dp_size, "tp_size": groups.tp_size}
        if mode in ("dp", "both"):
            out["dp"] = _dp_part(model, groups)
        if mode in ("tp", "both"):
            out["tp"] = _tp_part(model, groups)
        return out
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def single():
    (res,) = run_ranks(1, _rank, "both")
    assert res["dp_size"] == 1 and res["tp_size"] == 1
    return res


# ---------------------------------------------------------------- DP=2 equals DP=1

@pytest.fixture(scope="module")
def dp2():
    ranks = run_ranks(2, _rank, "dp")
    assert [r["dp_size"] for r in ranks] == [2, 2] and [r["dp_rank"] for r in ranks] == [0, 1]
    return ranks


@pytest.mark.parametrize("name", ["lb", "z", "ent", "rc"])
def test_dp2_equals_dp1(single, dp2, name):
    ref = single["dp"][name]
    half = B // 2
    mean_loss = sum(r["dp"][name]["loss"] for r in dp2) / 2
    torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-6, atol=0)
    for r in dp2:
        rows = slice(r["dp_rank"] * half, (r["dp_rank"] + 1) * half)
        for j in range(2):
            # DeepSpeed averages gradients over the 2 DP ranks.
            torch.testing.assert_close(r["dp"][name]["grads"][j] / 2, ref["grads"][j][rows], rtol=1e-5, atol=1e-8)
    for metric, value in ref["metrics"].items():
        torch.testing.assert_close(sum(r["dp"][name]["metrics"][metric] for r in dp2) / 2, value, rtol=1e-6, atol=0)
    assert any(g.abs().sum() > 0 for g in ref["grads"])


def test_dp_global_statistics_matter(single, dp2):
    """The halves differ enough that rank-local statistics would give other losses: the
    equality above needs the DP reductions."""
    # load_balance: the global shares are the same on both ranks, local ones would not be.
    assert dp2[0]["dp"]["lb"]["metrics"]["max_share"] == dp2[1]["dp"]["lb"]["metrics"]["max_share"]
    logits, _ = _fixed_batch()
    probs = torch.softmax(logits, -1)
    local = []
    for r in range(2):
        p = probs[:, r * B // 2:(r + 1) * B // 2].reshape(2, -1, E)
        f = torch.nn.functional.one_hot(p.argmax(-1), E).double().mean(1)
        local.append((E * (f * p.double().mean(1)).sum(-1)).mean())
    assert abs((sum(local) / 2).item() - single["dp"]["lb"]["loss"].item()) > 1e-2
    # routing_consistency: per-id means over a rank's own rows would give another loss.
    _, ids = _fixed_batch()
    local = []
    for r in range(2):
        rows = slice(r * B // 2, (r + 1) * B // 2)
        v = ids[rows].reshape(-1)
        onehot = torch.nn.functional.one_hot(v, 64).double()
        total = 0.0
        for j in range(2):
            p = probs[j, rows].reshape(-1, E).double()
            means = (onehot.T @ p) / onehot.sum(0).clamp_min(1)[:, None]
            total = total + ((p - means[v]) ** 2).sum(-1).mean() / 2
        local.append(total)
    assert abs((sum(local) / 2).item() - single["dp"]["rc"]["loss"].item()) > 1e-3


# ---------------------------------------------------------------- TP=2 equals TP=1

@pytest.fixture(scope="module")
def tp2():
    ranks = run_ranks(2, _rank, "tp")
    assert [r["tp_size"] for r in ranks] == [2, 2] and sorted(r["tp"]["tp_rank"] for r in ranks) == [0, 1]
    return ranks


@pytest.mark.parametrize("name", ["lb", "z", "ent", "rc"])
def test_tp2_equals_tp1(single, tp2, name):
    ref = single["tp"]["regs"][name]
    assert any(g.abs().sum() > 0 for g in ref["grads"])
    for r in tp2:
        res = r["tp"]["regs"][name]
        torch.testing.assert_close(res["loss"], ref["loss"], rtol=1e-5, atol=0)
        for metric, value in ref["metrics"].items():
            torch.testing.assert_close(res["metrics"][metric], value, rtol=1e-5, atol=0)
        for gate, g, g_ref in zip(GATES, res["grads"], ref["grads"]):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7, msg=lambda m: f"{gate}: {m}")
    # replicated router weight: the same gradient on both TP ranks
    for a, b in zip(tp2[0]["tp"]["regs"][name]["grads"], tp2[1]["tp"]["regs"][name]["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_tp1_values_match_a_reference_on_the_captured_routing(single):
    """Vectorised reference (one-hot counts, per-id means) on the real model's routing."""
    cap = single["tp"]["captured"]
    regs = single["tp"]["regs"]
    probs = [cap[f"blocks.{j}.moe.router_probs"].double().reshape(-1, E) for j in range(2)]
    logits = [cap[f"blocks.{j}.moe.router_logits"].double().reshape(-1, E) for j in range(2)]
    ids = cap["tokens"].reshape(-1)
    lb = sum(E * (torch.nn.functional.one_hot(p.argmax(-1), E).double().mean(0) * p.mean(0)).sum() for p in probs) / 2
    z = sum((torch.logsumexp(lg, -1) ** 2).mean() for lg in logits) / 2
    ent = -(probs[1] * probs[1].log()).sum(-1).mean()
    onehot = torch.nn.functional.one_hot(ids, 64).double()  # [N, V]
    rc = 0.0
    for p in probs:
        means = (onehot.T @ p) / onehot.sum(0).clamp_min(1)[:, None]
        rc = rc + ((p - means[ids]) ** 2).sum(-1).mean() / 2
    for name, expected in (("lb", lb), ("z", z), ("ent", ent), ("rc", rc)):
        torch.testing.assert_close(regs[name]["loss"].double(), expected, rtol=1e-5, atol=0, msg=name)
    assert regs["rc"]["loss"] > 0 and 0 < regs["rc"]["metrics"]["consistency"] <= 1
