"""Orthogonality regularizer: single-process reference, TP=2 == TP=1, sampled estimators' targets.

Each rank builds the GPT with the product's seeding, builds several orthogonality
regularizers at once through checked_regularizers/build_regularizers, and runs forwards (the
penalties are computed in forward hooks of the targeted linear layers). Step 0 also returns
each regularizer's gradients on the targeted local weights. Later steps only record the
values, for the statistical tests of the sampled estimators (fixed weights, fresh samples
each forward).
"""

from __future__ import annotations

import pytest
import torch

from spawn import run_ranks

import tti_dist.regularizers.orthogonality  # noqa: F401  (registers "orthogonality")
from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.regularizers import checked_regularizers

MODEL = dict(num_layers=2, hidden_size=64, num_heads=4, max_seq_len=16)
ALL = ["blocks.*.attn.*", "blocks.*.mlp.*"]
MLP = ["blocks.*.mlp.*"]
NUM_STEPS = 200
EXACT = ("full", "local_kn", "global_kn")
K = 4

TP1_ENTRIES = [
    {"type": "orthogonality", "name": "full", "coefficient": 1.0, "weights": ALL, "mode": "full"},
    {"type": "orthogonality", "name": "local_kn", "coefficient": 1.0, "weights": MLP, "mode": "sampled_local", "k": 256},
    {"type": "orthogonality", "name": "local_k", "coefficient": 1.0, "weights": MLP, "mode": "sampled_local", "k": K},
    {"type": "orthogonality", "name": "global_k", "coefficient": 1.0, "weights": MLP, "mode": "sampled_global", "k": K},
]
TP2_ENTRIES = [
    {"type": "orthogonality", "name": "full", "coefficient": 1.0, "weights": ALL, "mode": "full"},
    {"type": "orthogonality", "name": "global_kn", "coefficient": 1.0, "weights": MLP, "mode": "sampled_global", "k": 128},
    {"type": "orthogonality", "name": "local_k", "coefficient": 1.0, "weights": MLP, "mode": "sampled_local", "k": K},
    {"type": "orthogonality", "name": "global_k", "coefficient": 1.0, "weights": MLP, "mode": "sampled_global", "k": K},
]
TOO_BIG_AT_TP2 = [{"type": "orthogonality", "name": "big", "weights": MLP, "mode": "sampled_local", "k": 256}]


def _world() -> int:
    import os

    return int(os.environ["WORLD_SIZE"])


def _add_half_structure(model, tp_rank: int, tp_size: int) -> None:
    """Give MLP directions in each half of a matrix a shared component (same full weights at any tp).

    Directions within a half then correlate more than directions across halves, so the
    within-shard target of sampled_local (at tp=2) differs from the full penalty, and an
    estimator weighting the two kinds of pairs wrongly is biased.
    """
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not name.endswith(("mlp.fc1", "mlp.fc2")):
                continue
            w = module.weight
            dim = 0 if name.endswith("fc1") else 1  # the directions' index dimension
            full = list(w.shape)
            full[dim] *= tp_size
            num, length = full[dim], full[1 - dim]
            shared = torch.randn(2, length, generator=gen) * 0.02  # one vector per half (init_std)
            offset_ND = 0.6 * shared.repeat_interleave(num // 2, dim=0)
            offset = offset_ND if dim == 0 else offset_ND.t()
            w.add_(offset.chunk(tp_size, dim=dim)[tp_rank])


def _run(entries: list[dict], num_steps: int) -> dict:
    import tti_dist.regularizers.orthogonality  # noqa: F401
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT, tp_partition_dims
    from tti_dist.regularizers import build_regularizers, checked_regularizers
    from tti_dist.utils.seeding import seed_weights

    groups = init_parallel(_world(), torch.device("cpu"), 120)
    try:
        cfg = ModelConfig(**MODEL)
        seed_weights(7)
        model = GPT(cfg, groups)
        _add_half_structure(model, groups.tp_rank, groups.tp_size)
        regs = build_regularizers(checked_regularizers(entries, cfg), model, groups)
        try:
            for extra in build_regularizers(checked_regularizers(TOO_BIG_AT_TP2, cfg), model, groups):
                extra.remove_hooks()
            build_error = None
        except ConfigError as exc:
            build_error = str(exc)
        params = dict(model.named_parameters())
        tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(11))
        out = {"tp_rank": groups.tp_rank, "layout": tp_partition_dims(model), "build_error": build_error,
               "weights": {k: v.detach().clone() for k, v in params.items() if k.endswith(".weight") and "blocks" in k},
               "values": {r.spec.name: [] for r in regs}, "abs_cos": {r.spec.name: [] for r in regs}, "grads": {}}
        rng_before = torch.get_rng_state()
        for step in range(num_steps):
            if step == 3:  # exact modes are deterministic: keep only the sampled ones running
                for reg in regs:
                    if reg.spec.name in EXACT:
                        reg.remove_hooks()
                regs = [reg for reg in regs if reg.spec.name not in EXACT]
            model(tokens)
            for reg in regs:
                weighted, metrics = reg({}, step)
                name = reg.spec.name
                out["values"][name].append(metrics[f"reg/{name}/loss"].item())
                out["abs_cos"][name].append(metrics[f"reg/{name}/mean_abs_cos"].item())
                if step == 0:
                    targets = [f"{t}.weight" for t, _, _ in reg.targets]
                    grads = torch.autograd.grad(weighted, [params[t] for t in targets])
                    out["grads"][name] = dict(zip(targets, grads))
        out["rng_unchanged"] = torch.equal(rng_before, torch.get_rng_state())
        # Eval forwards (no grad) compute nothing; loss() then refuses to return a stale value.
        with torch.no_grad():
            model(tokens)
        try:
            regs[-1]({}, num_steps)
            out["stale_error"] = None
        except RuntimeError as exc:
            out["stale_error"] = str(exc)
        return out
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def results():
    tp1 = run_ranks(1, _run, TP1_ENTRIES, NUM_STEPS)[0]
    tp2 = run_ranks(2, _run, TP2_ENTRIES, NUM_STEPS)
    return tp1, tp2


# -- independent single-process reference ------------------------------------------------------
def _directions(weight: torch.Tensor, name: str) -> torch.Tensor:
    """Rows of qkv/fc1 (column-parallel), columns of proj/fc2 (row-parallel), as rows."""
    return weight.t() if name.endswith(("attn.proj.weight", "mlp.fc2.weight")) else weight


def _mean_sq_offdiag(dirs: torch.Tensor, power: int = 2) -> torch.Tensor:
    unit = dirs / dirs.norm(dim=1, keepdim=True)
    gram = unit @ unit.t()
    off = ~torch.eye(len(dirs), dtype=torch.bool)
    return gram[off].abs().pow(power).mean()


def _targets(weights: dict, sites: tuple[str, ...]) -> list[str]:
    return [k for k in weights if k.endswith(sites)]


def _reference(weights: dict, sites: tuple[str, ...], power: int = 2) -> torch.Tensor:
    names = _targets(weights, sites)
    return torch.stack([_mean_sq_offdiag(_directions(weights[n].double(), n), power) for n in names]).mean()


def _within_shard_reference(weights: dict, sites: tuple[str, ...], tp: int) -> torch.Tensor:
    names = _targets(weights, sites)
    per = [torch.stack([_mean_sq_offdiag(c) for c in _directions(weights[n].double(), n).chunk(tp, dim=0)]).mean()
           for n in names]
    return torch.stack(per).mean()


ALL_SITES = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
MLP_SITES = ("mlp.fc1.weight", "mlp.fc2.weight")


# -- full mode ----------------------------------------------------------------------------------
def test_full_matches_reference_at_tp1_and_tp2(results):
    tp1, tp2 = results
    expected = _reference(tp1["weights"], ALL_SITES).item()
    assert tp1["values"]["full"][0] == pytest.approx(expected, rel=1e-5)
    for r in tp2:
        assert r["values"]["full"][0] == pytest.approx(tp1["values"]["full"][0], rel=1e-5)
    expected_abs = _reference(tp1["weights"], ALL_SITES, power=1).item()
    for r in [tp1, *tp2]:
        assert r["abs_cos"]["full"][0] == pytest.approx(expected_abs, rel=1e-5)


def test_full_gradient_matches_autograd_reference(results):
    tp1, _ = results
    names = _targets(tp1["weights"], ALL_SITES)
    leaves = {n: tp1["weights"][n].double().requires_grad_() for n in names}
    ref = torch.stack([_mean_sq_offdiag(_directions(leaves[n], n)) for n in names]).mean()
    expected = torch.autograd.grad(ref, [leaves[n] for n in names])
    for n, g in zip(names, expected):
        torch.testing.assert_close(tp1["grads"]["full"][n].double(), g, rtol=1e-4, atol=1e-9, msg=lambda m: f"{n}: {m}")


def test_full_gradients_of_matching_shards(results):
    tp1, tp2 = results
    checked = 0
    for r in tp2:
        for n, g in r["grads"]["full"].items():
            dim = r["layout"][n]
            assert dim is not None, n  # every target is TP-sharded
            expected = tp1["grads"]["full"][n].chunk(2, dim=dim)[r["tp_rank"]]
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-9, msg=lambda m: f"{n}: {m}")
            checked += 1
    assert checked == 2 * 8


# -- sampled modes: exact cases -------------------------------------------------------------------
def test_sampled_local_with_all_directions_equals_full_at_tp1(results):
    tp1, _ = results
    expected = _reference(tp1["weights"], MLP_SITES).item()
    for v in tp1["values"]["local_kn"][:3]:
        assert v == pytest.approx(expected, rel=1e-6)


def test_sampled_global_with_local_width_equals_full_at_tp2(results):
    tp1, tp2 = results
    expected = _reference(tp1["weights"], MLP_SITES).item()
    for r in tp2:
        for v in r["values"]["global_kn"][:3]:
            assert v == pytest.approx(expected, rel=1e-5)
        # gradient: the full-mode gradient restricted to the MLP matrices, scaled (mean over 4 vs 8 matrices)
        for n, g in r["grads"]["global_kn"].items():
            full = r["grads"]["full"][n] * 8 / 4
            torch.testing.assert_close(g, full, rtol=1e-4, atol=1e-9, msg=lambda m: f"{n}: {m}")


def test_sampled_modes_agree_at_tp1(results):
    tp1, _ = results
    # Same seed, layer, rank and counter -> same samples; at tp=1 the estimators coincide.
    assert tp1["values"]["local_k"] == pytest.approx(tp1["values"]["global_k"], rel=1e-6)


def test_values_replicated_across_tp_ranks(results):
    _, tp2 = results
    for name in ("full", "global_kn", "local_k", "global_k"):
        assert tp2[0]["values"][name] == tp2[1]["values"][name], name


# -- sampled modes: what they estimate -------------------------------------------------------------
def _assert_unbiased(samples: list[float], target: float) -> None:
    x = torch.tensor(samples, dtype=torch.float64)
    assert x.std() > 0  # the draws really differ from step to step
    se = x.std().item() / len(x) ** 0.5
    assert abs(x.mean().item() - target) < 5 * se, (x.mean().item(), target, se)


def test_sampled_local_unbiased_for_full_at_tp1(results):
    tp1, _ = results
    _assert_unbiased(tp1["values"]["local_k"], _reference(tp1["weights"], MLP_SITES).item())


def test_sampled_global_unbiased_for_full_at_tp2(results):
    tp1, tp2 = results
    _assert_unbiased(tp2[0]["values"]["global_k"], _reference(tp1["weights"], MLP_SITES).item())


def test_sampled_local_targets_within_shard_pairs_at_tp2(results):
    tp1, tp2 = results
    within = _within_shard_reference(tp1["weights"], MLP_SITES, 2).item()
    _assert_unbiased(tp2[0]["values"]["local_k"], within)
    # ...which is not the full penalty here (the halves carry different shared components).
    x = torch.tensor(tp2[0]["values"]["local_k"], dtype=torch.float64)
    assert abs(within - _reference(tp1["weights"], MLP_SITES).item()) > 10 * x.std().item() / len(x) ** 0.5


def test_sampling_leaves_global_rng_alone_and_no_stale_values(results):
    tp1, tp2 = results
    for r in [tp1, *tp2]:
        assert r["rng_unchanged"]
        assert r["stale_error"] is not None and "no forward with grad enabled" in r["stale_error"]


def test_k_checked_against_local_width_at_build(results):
    tp1, tp2 = results
    assert tp1["build_error"] is None  # k = 256 fits the global width at tp=1
    for r in tp2:
        assert r["build_error"] is not None
        assert r["build_error"].startswith("regularizers[0].k: 256 exceeds the local width 128")


# -- config errors (before any process group) -------------------------------------------------------
CFG = ModelConfig(**MODEL)


@pytest.mark.parametrize("entry, field", [
    ({"mode": "sampled_local", "k": 257}, "regularizers[0].k: 257 exceeds the local width 256"),
    ({"mode": "sampled_global", "k": 1}, "regularizers[0].k: 1 must be >= 2"),
    ({"mode": "sampled_local"}, "regularizers[0].k: required"),
    ({"mode": "full", "k": 8}, "regularizers[0].k: 8 is only used by sampled modes"),
    ({"weights": ["blocks.*.mlp.fc3"]}, "regularizers[0].weights[0]: 'blocks.*.mlp.fc3' matches no linear layer; "
                                        "available: blocks.{0..1}.attn.qkv"),
    ({"weights": []}, "regularizers[0].weights: needs at least one glob"),
    ({"coefficient": -1.0}, "regularizers[0].coefficient"),
    ({"mode": "exact"}, "regularizers[0].mode: 'exact' is not allowed"),
    ({"kk": 4}, "regularizers[0].kk: unknown key"),
    ({"hookpoints": ["blocks.*.mlp.act"]}, "regularizers[0].hookpoints: 'orthogonality' acts on weights"),
])
def test_bad_config(entry, field):
    with pytest.raises(ConfigError) as info:
        checked_regularizers([{"type": "orthogonality", "coefficient": 1.0, **entry}], CFG)
    assert str(info.value).startswith(field), str(info.value)
    assert "\n" not in str(info.value)


def test_k_checked_against_local_width_before_launch():
    """With the run's tp_size, a k that fits the global but not the local width is a
    config error before any process starts (not a failure inside the ranks)."""
    entry = {"type": "orthogonality", "coefficient": 1.0, "mode": "sampled_local", "k": 200}
    checked_regularizers([entry], CFG, tp_size=1)
    with pytest.raises(ConfigError) as info:
        checked_regularizers([entry], CFG, tp_size=2)
    assert str(info.value).startswith("regularizers[0].k: 200 exceeds the local width 128 of blocks.0.mlp.fc1 "
                                      "(global width 256 / tp_size 2")


def test_good_config_parses():
    (spec,) = checked_regularizers([{"type": "orthogonality", "coefficient": 0.1, "weights": ["blocks.0.mlp.fc2"],
                                     "mode": "sampled_global", "k": 16, "seed": 3}], CFG)
    assert spec.params.weights == ("blocks.0.mlp.fc2",) and spec.params.k == 16
