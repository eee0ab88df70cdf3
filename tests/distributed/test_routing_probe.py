"""RoutingProbe (moe/blocks.{i}/*: nmi_<factor>, nmi_token, stability, probe_dropped_frac).

- One rank: factors built from the model's own routing give known answers (a factor equal
  to the first-choice expert: NMI 1, also after relabeling the experts; a constant factor:
  NMI 0), nmi_token equals a direct computation, stability is 1 without training and 0
  after cyclically relabeling the router's experts, the model's mode and the RNG state are
  restored, and state_dict/load_state_dict carry the previous routing over.
- DP=2 (and EP=2): every reported value equals the one-process value on the union of both
  ranks' probe batches (recomputed here from each rank's independently captured experts),
  and the gathered state_dict holds every rank's routing.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from spawn import run_ranks

pytestmark = pytest.mark.slow

E = 4
VOCAB = 64
ROUTER = "blocks.0.moe.layer.deepspeed_moe.gate.wg.weight"
LAYERS = ("blocks.0.moe.expert", "blocks.1.moe.expert")


def _model_cfg(eval_capacity_factor: float = 4.0, num_experts: int = E):
    from tti_dist.config.schema import ModelConfig

    # eval capacity factor E: capacity = all tokens, so no route is dropped in eval mode
    # (DeepSpeed drops at random among the tokens over capacity).
    return ModelConfig(num_layers=2, hidden_size=32, num_heads=2, max_seq_len=16, vocab_size=VOCAB,
                       vocab_pad_multiple=64, moe_num_experts=num_experts, moe_min_capacity=1,
                       moe_eval_capacity_factor=eval_capacity_factor)


def _capture_first_choice(model, token_batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """First-choice expert per input position (flat, batches concatenated), per MoE layer."""
    from tti_dist.capture.hookpoints import ActivationCapture, resolve_hookpoints

    hps = resolve_hookpoints(model, ["blocks.*.moe.expert"], "test")
    was_training = model.training
    model.eval()
    out = {hp.name: [] for hp in hps}
    with torch.no_grad(), ActivationCapture(hps) as cap:
        for tokens in token_batches:
            model(tokens[:, :-1])
            for name in out:
                out[name].append(cap.captured[name][..., 0].reshape(-1).clone())
    model.train(was_training)
    return {name: torch.cat(p) for name, p in out.items()}


def _flat_inputs(column_batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([c[:, :-1].reshape(-1) for c in column_batches])


def _nmi(a, b, num_b):
    from tti_dist.metrics.routing import contingency_counts, normalized_mutual_information

    return normalized_mutual_information(contingency_counts(a, b, E, num_b))


def _single_run() -> None:
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.metrics.routing import routing_agreement
    from tti_dist.metrics.routing_probe import RoutingProbe
    from tti_dist.models.gpt import GPT
    from tti_dist.utils.seeding import seed_weights

    groups = init_parallel(1, torch.device("cpu"), 120)
    try:
        seed_weights(7)
        model = GPT(_model_cfg(), groups.with_experts(1))
        gen = torch.Generator().manual_seed(3)
        tokens = [torch.randint(0, VOCAB, (2, 13), generator=gen) for _ in range(3)]
        first = _capture_first_choice(model, tokens)
        assert all((f >= 0).all() for f in first.values())  # no drops at this capacity
        # Factor columns aligned with the inputs; the last (target-only) position is -1.
        batches = []
        offset = 0
        for t in tokens:
            n = t[:, :-1].numel()
            expert0 = torch.full_like(t, -1)
            expert0[:, :-1] = first[LAYERS[0]][offset:offset + n].reshape(t.shape[0], -1)
            offset += n
            sparse = torch.randint(-1, 3, t.shape, generator=gen)  # about a quarter inactive
            batches.append({"tokens": t, "factor_expert0": expert0, "factor_const": torch.zeros_like(t),
                            "factor_sparse": sparse})
        tokens_N = _flat_inputs(tokens)
        sparse_N = _flat_inputs([b["factor_sparse"] for b in batches])

        probe = RoutingProbe(model, batches, groups, VOCAB)
        model.train()
        rng = torch.get_rng_state()
        m1 = probe.measure(model)
        assert model.training and torch.equal(torch.get_rng_state(), rng)
        expected_keys = {f"moe/blocks.{i}/{k}" for i in (0, 1)
                         for k in ("nmi_expert0", "nmi_const", "nmi_sparse", "nmi_token", "probe_dropped_frac")}
        assert set(m1) == expected_keys, sorted(m1)
        assert m1["moe/blocks.0/nmi_expert0"] == pytest.approx(1.0, abs=1e-12)
        for i, name in enumerate(LAYERS):
            p = f"moe/blocks.{i}/"
            occupied = int((torch.bincount(first[name], minlength=E) > 0).sum())
            assert m1[p + "nmi_const"] == (0.0 if occupied > 1 else 1.0)
            assert m1[p + "nmi_token"] == _nmi(first[name], tokens_N, VOCAB)
            assert m1[p + "nmi_sparse"] == _nmi(first[name], sparse_N, 3)
            assert m1[p + "probe_dropped_frac"] == 0.0
            assert torch.equal(probe.previous[name], first[name])
        assert 0.0 < m1["moe/blocks.0/nmi_token"] < 1.0

        # No training: the same routing, stability 1.
        m2 = probe.measure(model)
        for i in (0, 1):
            assert m2[f"moe/blocks.{i}/stability"] == 1.0
        assert {k: v for k, v in m2.items() if not k.endswith("stability")} == m1
        state = probe.state_dict()

        # Relabel layer 0's experts cyclically (row e of the router <- row e-1): every token
        # of layer 0 moves to the next expert, so nothing agrees and NMI is unchanged.
        with torch.no_grad():
            w = model.get_parameter(ROUTER)
            w.copy_(torch.roll(w, 1, dims=0))
        after = _capture_first_choice(model, tokens)
        assert torch.equal(after[LAYERS[0]], (first[LAYERS[0]] + 1) % E)
        m3 = probe.measure(model)
        assert m3["moe/blocks.0/stability"] == 0.0
        assert m3["moe/blocks.0/nmi_expert0"] == pytest.approx(1.0, abs=1e-12)
        assert m3["moe/blocks.1/stability"] == routing_agreement(first[LAYERS[1]], after[LAYERS[1]])

        # A resumed probe reports stability against the state's routing at its first measure.
        resumed = RoutingProbe(model, batches, groups, VOCAB)
        resumed.load_state_dict(state)
        assert resumed.measure(model) == m3
        # A state that does not fit (another probe size) is dropped with a warning.
        other = RoutingProbe(model, batches[:2], groups, VOCAB)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("tti_dist.metrics.routing_probe").addHandler(handler)
        other.load_state_dict(state)
        assert other.previous is None and any("does not match" in r.getMessage() for r in records)
        assert not any(k.endswith("stability") for k in other.measure(model))
        # Before any measure the state is empty and loads as "no previous".
        fresh = RoutingProbe(model, batches, groups, VOCAB)
        fresh.load_state_dict(fresh.state_dict())
        assert fresh.previous is None

        # Without factor columns only nmi_token is reported.
        plain = RoutingProbe(model, [{"tokens": t} for t in tokens], groups, VOCAB)
        assert {k.rsplit("/", 1)[1] for k in plain.measure(model)} == {"nmi_token", "probe_dropped_frac"}

        # Eval capacity below the load: dropped routes are counted, left out of the NMI
        # tables, and do not affect stability (only routes present in both measures count).
        seed_weights(7)
        tight = GPT(_model_cfg(eval_capacity_factor=0.5), groups.with_experts(1))
        probe = RoutingProbe(tight, batches, groups, VOCAB)
        t1 = probe.measure(tight)
        t2 = probe.measure(tight)
        for i, name in enumerate(LAYERS):
            p = f"moe/blocks.{i}/"
            routes = probe.previous[name]
            assert t1[p + "probe_dropped_frac"] == t2[p + "probe_dropped_frac"] == (routes < 0).double().mean().item()
            assert t2[p + "probe_dropped_frac"] > 0.0
            assert t2[p + "stability"] == 1.0
            assert t2[p + "nmi_token"] == _nmi(routes, tokens_N, VOCAB)

        # A dense model has no routing to probe.
        seed_weights(7)
        dense = GPT(_model_cfg(num_experts=0), groups.with_experts(1))
        with pytest.raises(ValueError, match="no MoE layer"):
            RoutingProbe(dense, batches, groups, VOCAB)
    finally:
        shutdown_parallel()


def test_routing_probe_single_process():
    run_ranks(1, _single_run)


def _dp_batches(dp_rank: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(10 + dp_rank)
    # Rank 1 holds larger factor values: the table size comes from the global maximum.
    top = 4 if dp_rank == 0 else 7
    return [{"tokens": torch.randint(0, VOCAB, (2, 13), generator=gen),
             "factor_a": torch.randint(-1, top, (2, 13), generator=gen),
             "factor_b": torch.randint(0, 2, (2, 13), generator=gen)} for _ in range(2)]


def _dp_run() -> dict:
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.metrics.routing_probe import RoutingProbe
    from tti_dist.models.gpt import GPT
    from tti_dist.utils.seeding import seed_weights

    groups = init_parallel(1, torch.device("cpu"), 120)
    try:
        batches = _dp_batches(groups.dp_rank)
        tokens = [b["tokens"] for b in batches]
        out = {}
        for ep in (1, 2):
            seed_weights(7)
            model = GPT(_model_cfg(), groups.with_experts(ep))
            probe = RoutingProbe(model, batches, groups, VOCAB)
            res = {"first": _capture_first_choice(model, tokens), "m1": probe.measure(model)}
            with torch.no_grad():  # the same perturbation on every rank
                w = model.get_parameter(ROUTER)
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std())
            res["second"] = _capture_first_choice(model, tokens)
            res["m2"] = probe.measure(model)
            res["previous"] = probe.previous
            res["state"] = probe.state_dict()
            resumed = RoutingProbe(model, batches, groups, VOCAB)
            resumed.load_state_dict(res["state"])
            res["resumed_previous"] = resumed.previous
            out[ep] = res
        return out
    finally:
        shutdown_parallel()


def test_routing_probe_dp2_equals_union():
    from tti_dist.metrics.routing import routing_agreement

    results = run_ranks(2, _dp_run)
    batches = [_dp_batches(r) for r in (0, 1)]
    tokens_N = torch.cat([_flat_inputs([b["tokens"] for b in bs]) for bs in batches])
    factors_N = {f: torch.cat([_flat_inputs([b[f"factor_{f}"] for b in bs]) for bs in batches]) for f in "ab"}
    for ep in (1, 2):
        first = {n: torch.cat([results[r][ep]["first"][n] for r in (0, 1)]) for n in LAYERS}
        second = {n: torch.cat([results[r][ep]["second"][n] for r in (0, 1)]) for n in LAYERS}
        for rank in (0, 1):
            res = results[rank][ep]
            assert res["m1"] == results[0][ep]["m1"] and res["m2"] == results[0][ep]["m2"]
            for n in LAYERS:
                assert torch.equal(res["previous"][n], res["second"][n])
                assert torch.equal(res["resumed_previous"][n], res["second"][n])
                state = res["state"]
                assert state["first_choice"].shape == (2, 2, 48) and state["num_positions"].tolist() == [48, 48]
                for r in (0, 1):
                    assert torch.equal(state["first_choice"][r, LAYERS.index(n)], results[r][ep]["second"][n])
        m1, m2 = results[0][ep]["m1"], results[0][ep]["m2"]
        assert "moe/blocks.0/stability" not in m1
        for i, n in enumerate(LAYERS):
            p = f"moe/blocks.{i}/"
            for key, routes in (("m1", first[n]), ("m2", second[n])):
                got = results[0][ep][key]
                assert got[p + "nmi_token"] == pytest.approx(_nmi(routes, tokens_N, VOCAB), abs=1e-12)
                assert got[p + "nmi_a"] == pytest.approx(_nmi(routes, factors_N["a"], 7), abs=1e-12)
                assert got[p + "nmi_b"] == pytest.approx(_nmi(routes, factors_N["b"], 2), abs=1e-12)
                assert got[p + "probe_dropped_frac"] == 0.0
            assert m2[p + "stability"] == pytest.approx(routing_agreement(first[n], second[n]), abs=1e-12)
        assert 0.0 < m2["moe/blocks.0/stability"] < 1.0
    # Expert parallelism routes like EP=1.
    for key in ("m1", "m2"):
        assert results[0][2][key] == pytest.approx(results[0][1][key], abs=1e-12)
        assert all(not math.isnan(v) for v in results[0][1][key].values())
