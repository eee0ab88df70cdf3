"""MoE routing regularizers (load_balance, router_z, routing_entropy, routing_consistency):
values and gradients against single-process references written here with plain loops,
closed forms, and config validation.

The regularizers are built around a tiny MoE GPT on a real one-rank gloo process group and
called on random tensors standing in for the captured router_probs / router_logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.regularizers import build_regularizers, checked_regularizers

E = 4
MOE_CFG = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, max_seq_len=16, vocab_size=64,
                      vocab_pad_multiple=64, moe_num_experts=E, moe_min_capacity=1)
DENSE_CFG = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, max_seq_len=16, vocab_size=64,
                        vocab_pad_multiple=64)
PROBS = ["blocks.0.moe.router_probs", "blocks.1.moe.router_probs"]
LOGITS = ["blocks.0.moe.router_logits", "blocks.1.moe.router_logits"]
F64 = torch.float64


@pytest.fixture(scope="module")
def model_groups():
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel, single_process_env
    from tti_dist.models.gpt import GPT
    from tti_dist.utils.seeding import seed_weights

    with single_process_env():
        groups = init_parallel(1, torch.device("cpu"), 60, ep_size=1)
        try:
            seed_weights(0)
            yield GPT(MOE_CFG, groups), groups
        finally:
            shutdown_parallel()


def _build(model_groups, kind: str, hookpoints, name: str | None = None):
    model, groups = model_groups
    entry = {"type": kind, "name": name or kind, "coefficient": 1.0, "hookpoints": hookpoints}
    (reg,) = build_regularizers(checked_regularizers([entry], MOE_CFG), model, groups)
    return reg


def _random_router(seed: int, shape=(3, 8)):
    """Per layer: (logits, probs) as float32 leaves, probs from a softmax of skewed logits."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        logits = 2.0 * torch.randn(*shape, E, generator=g) + torch.tensor([1.0, 0.0, -0.5, 0.3])
        out.append((logits.requires_grad_(), torch.softmax(logits, -1).detach().requires_grad_()))
    return out


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(F64).reshape(-1, t.shape[-1]).requires_grad_()


# ---------------------------------------------------------------- references (plain loops)

def ref_load_balance(layers: list[torch.Tensor]) -> torch.Tensor:
    losses = []
    for p in layers:
        n, num_e = p.shape
        share = [0.0] * num_e
        for t in range(n):
            row = p[t].tolist()
            share[row.index(max(row))] += 1.0 / n
        mean_p = [sum(p[t, e] for t in range(n)) / n for e in range(num_e)]
        losses.append(num_e * sum(share[e] * mean_p[e] for e in range(num_e)))
    return sum(losses) / len(losses)


def ref_max_share(layers: list[torch.Tensor]) -> float:
    out = 0.0
    for p in layers:
        counts = [0] * p.shape[1]
        for row in p.tolist():
            counts[row.index(max(row))] += 1
        out += p.shape[1] * max(counts) / p.shape[0]
    return out / len(layers)


def ref_z(layers: list[torch.Tensor]) -> torch.Tensor:
    losses = []
    for logits in layers:
        n, num_e = logits.shape
        per_token = [torch.log(sum(torch.exp(logits[t, e]) for e in range(num_e))) ** 2 for t in range(n)]
        losses.append(sum(per_token) / n)
    return sum(losses) / len(losses)


def ref_entropy(layers: list[torch.Tensor]) -> torch.Tensor:
    losses = []
    for p in layers:
        n, num_e = p.shape
        total = 0.0
        for t in range(n):
            for e in range(num_e):
                if p[t, e].item() > 0:
                    total = total - p[t, e] * torch.log(p[t, e])
        losses.append(total / n)
    return sum(losses) / len(losses)


def ref_consistency(layers: list[torch.Tensor], ids: list[int]) -> tuple[torch.Tensor, float]:
    """Within-token-id variance with the group means NOT detached (the full gradient), and the
    share of tokens whose argmax equals their id's mean-route argmax."""
    losses, agree = [], 0.0
    for p in layers:
        n = p.shape[0]
        members: dict[int, list[int]] = {}
        for t, v in enumerate(ids):
            members.setdefault(v, []).append(t)
        total, same = 0.0, 0
        for rows in members.values():
            mean = sum(p[t] for t in rows) / len(rows)
            for t in rows:
                total = total + ((p[t] - mean) ** 2).sum()
                same += int(p[t].argmax().item() == mean.argmax().item())
        losses.append(total / n)
        agree += same / n
    return sum(losses) / len(losses), agree / len(layers)


# ---------------------------------------------------------------- values and gradients

def _check_grads(ours: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    for mine, ref in zip(ours, refs):
        assert mine.grad is not None and ref.grad is not None
        assert ref.grad.abs().sum() > 0
        torch.testing.assert_close(mine.grad.reshape(-1, E), ref.grad.float(), rtol=1e-5, atol=1e-7)


def test_load_balance_matches_reference(model_groups):
    reg = _build(model_groups, "load_balance", ["blocks.*.moe.router_probs"], "lb")
    layers = _random_router(0)
    probs = [p for _, p in layers]
    weighted, metrics = reg(dict(zip(PROBS, probs)), step=0)
    weighted.backward()
    refs = [_as64(p) for p in probs]
    expected = ref_load_balance(refs)
    expected.backward()
    torch.testing.assert_close(metrics["reg/lb/loss"].double(), expected.detach(), rtol=1e-6, atol=0)
    assert metrics["reg/lb/max_share"].item() == pytest.approx(ref_max_share(refs), rel=1e-6)
    assert metrics["reg/lb/max_share"].item() > 1.2  # skewed routing: the test is not trivial
    _check_grads(probs, refs)


def test_router_z_matches_reference(model_groups):
    reg = _build(model_groups, "router_z", ["blocks.*.moe.router_logits"], "z")
    logits = [lg for lg, _ in _random_router(1)]
    weighted, metrics = reg(dict(zip(LOGITS, logits)), step=0)
    weighted.backward()
    refs = [_as64(lg) for lg in logits]
    expected = ref_z(refs)
    expected.backward()
    torch.testing.assert_close(metrics["reg/z/loss"].double(), expected.detach(), rtol=1e-6, atol=0)
    _check_grads(logits, refs)


def test_routing_entropy_matches_reference(model_groups):
    reg = _build(model_groups, "routing_entropy", ["blocks.*.moe.router_probs"], "ent")
    probs = [p for _, p in _random_router(2)]
    weighted, metrics = reg(dict(zip(PROBS, probs)), step=0)
    weighted.backward()
    refs = [_as64(p) for p in probs]
    expected = ref_entropy(refs)
    expected.backward()
    torch.testing.assert_close(metrics["reg/ent/loss"].double(), expected.detach(), rtol=1e-6, atol=0)
    _check_grads(probs, refs)


def test_routing_consistency_matches_reference(model_groups):
    """Also checks the docstring's claim: detaching the group means gives the full gradient
    (the reference keeps them attached)."""
    reg = _build(model_groups, "routing_consistency", ["blocks.*.moe.router_probs"], "rc")
    assert [hp.name for hp in reg.captures] == ["tokens"] + PROBS
    probs = [p for _, p in _random_router(3)]
    ids = torch.randint(0, 5, (3, 8), generator=torch.Generator().manual_seed(4))
    ids[0, 0] = 63  # the last id of the vocabulary, seen once
    weighted, metrics = reg({"tokens": ids, **dict(zip(PROBS, probs))}, step=0)
    weighted.backward()
    refs = [_as64(p) for p in probs]
    expected, agree = ref_consistency(refs, ids.reshape(-1).tolist())
    expected.backward()
    torch.testing.assert_close(metrics["reg/rc/loss"].double(), expected.detach(), rtol=1e-6, atol=0)
    assert metrics["reg/rc/consistency"].item() == pytest.approx(agree, rel=1e-6)
    assert 0 < agree < 1
    _check_grads(probs, refs)


def test_only_the_configured_layers_count(model_groups):
    reg = _build(model_groups, "routing_entropy", ["blocks.1.moe.router_probs"], "ent1")
    probs = [p for _, p in _random_router(5)]
    value, _ = reg.loss(dict(zip(PROBS, probs)))
    torch.testing.assert_close(value.double(), ref_entropy([_as64(probs[1])]).detach(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- closed forms

def _uniform(shape=(2, 8)) -> torch.Tensor:
    return torch.full((*shape, E), 1.0 / E, requires_grad=True)


def test_closed_forms(model_groups):
    # load balance: 1 for balanced first choices with equal mean probabilities ...
    lb = _build(model_groups, "load_balance", ["blocks.0.moe.router_probs"], "lb_cf")
    balanced = torch.full((16, E), 0.1)
    balanced[torch.arange(16), torch.arange(16) % E] = 0.7
    value, metrics = lb.loss({PROBS[0]: balanced.view(2, 8, E)})
    assert value.item() == pytest.approx(1.0, rel=1e-6) and metrics["max_share"].item() == pytest.approx(1.0)
    # ... and for uniform probabilities whatever the first choices; E when all go to one expert.
    assert lb.loss({PROBS[0]: _uniform()})[0].item() == pytest.approx(1.0, rel=1e-6)
    collapsed = torch.zeros(2, 8, E)
    collapsed[..., 2] = 1.0
    value, metrics = lb.loss({PROBS[0]: collapsed})
    assert value.item() == pytest.approx(E) and metrics["max_share"].item() == pytest.approx(E)

    z = _build(model_groups, "router_z", ["blocks.0.moe.router_logits"], "z_cf")
    assert z.loss({LOGITS[0]: torch.zeros(2, 8, E)})[0].item() == pytest.approx(math.log(E) ** 2, rel=1e-6)

    ent = _build(model_groups, "routing_entropy", ["blocks.0.moe.router_probs"], "ent_cf")
    assert ent.loss({PROBS[0]: _uniform()})[0].item() == pytest.approx(math.log(E), rel=1e-6)
    one_hot = collapsed.clone().requires_grad_()
    value, _ = ent.loss({PROBS[0]: one_hot})
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(one_hot.grad).all()  # 0 log 0 = 0, finite gradient

    rc = _build(model_groups, "routing_consistency", ["blocks.0.moe.router_probs"], "rc_cf")
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 9]] * 2)
    per_id = torch.softmax(torch.randn(64, E, generator=torch.Generator().manual_seed(0)), -1)
    probs = per_id[ids].requires_grad_()
    value, metrics = rc.loss({"tokens": ids, PROBS[0]: probs})
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12) and metrics["consistency"].item() == 1.0
    assert probs.grad.abs().max().item() < 1e-7


# ---------------------------------------------------------------- config validation

def test_router_sites_are_accepted():
    specs = checked_regularizers([
        {"type": "load_balance", "coefficient": 0.01, "hookpoints": ["blocks.*.moe.router_probs"],
         "schedule": {"kind": "linear_anneal", "anneal_steps": 10, "final_ratio": 0.1}},
        {"type": "router_z", "coefficient": 1e-3, "hookpoints": "blocks.*.moe.router_logits"},
        {"type": "routing_entropy", "hookpoints": ["blocks.1.moe.router_probs"]},
        {"type": "routing_consistency", "hookpoints": ["blocks.0.moe.router_probs"]},
    ], MOE_CFG)
    assert [s.type for s in specs] == ["load_balance", "router_z", "routing_entropy", "routing_consistency"]
    assert specs[0].schedule.factor(10) == pytest.approx(0.1)


def _error(entries, cfg=MOE_CFG) -> str:
    with pytest.raises(ConfigError) as info:
        checked_regularizers(entries, cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("entry, message", [
    ({"type": "load_balance", "hookpoints": ["blocks.0.moe.router_logits"]},
     "regularizers[0].hookpoints: 'blocks.0.moe.router_logits' is not a router hookpoint; 'load_balance' reads "
     "blocks.<i>.moe.router_probs only; allowed: blocks.{0..1}.moe.router_probs"),
    ({"type": "load_balance", "hookpoints": ["blocks.0.resid_post"]},
     "regularizers[0].hookpoints: 'blocks.0.resid_post' is not a router hookpoint; 'load_balance' reads "
     "blocks.<i>.moe.router_probs only; allowed: blocks.{0..1}.moe.router_probs"),
    ({"type": "router_z", "hookpoints": ["blocks.*.moe.router_*"]},
     "regularizers[0].hookpoints: 'blocks.0.moe.router_probs' is not a router hookpoint; 'router_z' reads "
     "blocks.<i>.moe.router_logits only; allowed: blocks.{0..1}.moe.router_logits"),
    ({"type": "routing_entropy", "hookpoints": ["blocks.1.moe.expert"]},
     "regularizers[0].hookpoints: 'blocks.1.moe.expert' is not a router hookpoint; 'routing_entropy' reads"),
    ({"type": "routing_consistency", "hookpoints": ["tokens"]},
     "regularizers[0].hookpoints: 'tokens' is not a router hookpoint; 'routing_consistency' reads "
     "blocks.<i>.moe.router_probs only"),
    ({"type": "load_balance", "hookpoints": ["blocks.0.moe.router_probs"], "top_k": 2},
     "regularizers[0].top_k: unknown key for type 'load_balance'"),
])
def test_wrong_site_errors(entry, message):
    assert _error([entry]).startswith(message)


@pytest.mark.parametrize("kind", ["load_balance", "router_z", "routing_entropy", "routing_consistency"])
def test_dense_model_errors(kind):
    message = _error([{"type": kind, "hookpoints": ["blocks.*.resid_post"]}], DENSE_CFG)
    assert message.startswith(f"regularizers[0].hookpoints: 'blocks.0.resid_post' is not a router hookpoint; "
                              f"{kind!r} reads")
    assert message.endswith("allowed: none (model.moe_num_experts is 0)")
    message = _error([{"type": kind, "hookpoints": ["blocks.*.moe.router_probs"]}], DENSE_CFG)
    assert message.startswith("regularizers[0].hookpoints[0]: 'blocks.*.moe.router_probs' matches no hookpoint")
