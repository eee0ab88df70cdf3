"""Stochastic bottleneck + `kl` + `total_correlation` on real gloo ranks.

- GPT with a bottleneck, training mode: TP=2 equals TP=1 from the same seeds (the noise is
  drawn at full width from the shared runtime seed): logits, task loss, KL and TC (both
  estimators) values, the sampled latents, and each loss's gradients of matching shards.
- The same GPT with a fixed noise tensor: DP=2 equals DP=1 on the same global batch (loss
  values averaged over DP ranks, gradients averaged over DP as DeepSpeed does).
- Plain tensors: the regularizers against a float64 single-process reference built from
  tti_dist.metrics.total_correlation, at TP=1, TP=2 and DP=2 (values, gradients = dp_size x
  the global-batch gradient of the rank's rows), token sampling identical across TP ranks
  and reproduced by state_dict/load_state_dict.

Layouts (Megatron order): world 2 with tp 2 = TP group {0,1}; world 2 with tp 1 = DP group {0,1}.
"""

from __future__ import annotations

import pytest
import torch

from spawn import run_ranks

# Plain tensors: batch, sequence, latents.
B, T, Z = 4, 6, 4
PLAIN_ENTRIES = {
    "kl": {"type": "kl", "name": "kl", "coefficient": 1.0, "hookpoints": ["blocks.0.bottleneck.z"]},
    "tc_mss": {"type": "total_correlation", "name": "tc", "coefficient": 1.0, "hookpoints": ["blocks.0.bottleneck.z"]},
    "tc_mss_n": {"type": "total_correlation", "name": "tc", "coefficient": 1.0, "dataset_size": 1000,
                 "hookpoints": ["blocks.0.bottleneck.z"]},
    "tc_mws": {"type": "total_correlation", "name": "tc", "coefficient": 2.0, "estimator": "mws", "dataset_size": 1000,
               "hookpoints": ["blocks.0.bottleneck.z"]},
    "tc_sampled": {"type": "total_correlation", "name": "tc", "coefficient": 1.0, "max_tokens": 5, "seed": 3,
                   "hookpoints": ["blocks.0.bottleneck.z"]},
}

GPT_CFG = dict(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16, bottleneck_layer=0, bottleneck_dim=8)
GPT_ENTRIES = [
    {"type": "kl", "name": "kl", "coefficient": 1.0, "hookpoints": ["blocks.*.bottleneck.z"]},
    {"type": "total_correlation", "name": "tc_mss", "coefficient": 1.0, "max_tokens": 64,
     "hookpoints": ["blocks.0.bottleneck.z"]},
    {"type": "total_correlation", "name": "tc_mws", "coefficient": 1.0, "max_tokens": 64, "estimator": "mws",
     "dataset_size": 10_000, "hookpoints": ["blocks.0.bottleneck.z"]},
]
GPT_BATCH, GPT_SEQ = 4, 12  # 44 predicted tokens: <= max_tokens, so no sampling in the GPT runs
LOSSES = ("task", "kl", "tc_mss", "tc_mws")


def _plain_tensors() -> dict[str, torch.Tensor]:
    """mu, logvar, eps [B, T, Z]; latent 0 sits at the prior (KL < 0.01), the others do not."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(Z, Z, generator=g) * 0.6 + torch.eye(Z)
    mu = torch.randn(B, T, Z, generator=g) @ mix + 0.3
    logvar = torch.randn(B, T, Z, generator=g) * 0.4 - 1.0
    mu[..., 0] *= 0.01
    logvar[..., 0] *= 0.01
    eps = torch.randn(B, T, Z, generator=g)
    return {"mu": mu, "logvar": logvar, "eps": eps}


def _toy_model():
    from torch import nn

    from tti_dist.capture.hookpoints import HookPoint

    bottleneck = nn.Module()
    for site, dim, sharded in (("mu", Z, True), ("logvar", Z, True), ("z", Z, True), ("out", 8, False)):
        setattr(bottleneck, f"hook_{site}", HookPoint(dim, tp_sharded=sharded))
    block = nn.Module()
    block.bottleneck = bottleneck
    model = nn.Module()
    model.blocks = nn.ModuleList([block])
    return model


def _gather_tp(x: torch.Tensor, groups) -> torch.Tensor:
    import torch.distributed as dist

    if groups.tp_size == 1:
        return x.detach().clone()
    pieces = [torch.empty_like(x) for _ in range(groups.tp_size)]
    dist.all_gather(pieces, x.detach().contiguous(), group=groups.tp_group)
    return torch.cat(pieces, dim=-1)


def _plain(groups) -> dict:
    from tti_dist.config.schema import ModelConfig
    from tti_dist.regularizers import build_regularizers, checked_regularizers

    cfg = ModelConfig(num_layers=1, hidden_size=8, num_heads=2, max_seq_len=16, bottleneck_layer=0, bottleneck_dim=Z)
    full = _plain_tensors()
    out = {}
    for key, entry in PLAIN_ENTRIES.items():
        (reg,) = build_regularizers(checked_regularizers([entry], cfg, groups.tp_size), _toy_model(), groups)

        def call():
            local = {k: v.chunk(groups.dp_size, dim=0)[groups.dp_rank].chunk(groups.tp_size, dim=-1)[groups.tp_rank]
                     for k, v in full.items()}
            mu = local["mu"].clone().requires_grad_(True)
            logvar = local["logvar"].clone().requires_grad_(True)
            z = mu + torch.exp(0.5 * logvar) * local["eps"]
            acts = {"blocks.0.bottleneck.mu": mu, "blocks.0.bottleneck.logvar": logvar, "blocks.0.bottleneck.z": z}
            weighted, metrics = reg(acts, step=0)
            weighted.backward()
            return {"weighted": weighted.detach(), "metrics": metrics, "grad_mu": mu.grad, "grad_logvar": logvar.grad}

        num_local = B * T // groups.dp_size
        res = {"idx": reg.token_index(num_local, 0, torch.device("cpu")) if key != "kl" else None,
               "captures": [hp.name for hp in reg.captures], **call()}
        if key == "tc_sampled":
            res["state_after_one"] = reg.state_dict()
            res["idx_call1"] = reg.token_index(num_local, 1, torch.device("cpu"))
            second = call()
            reg.load_state_dict({"calls": 0})
            res["replayed"] = call()["weighted"]
            res["second"] = second["weighted"]
        out[key] = res
    return out


def _gpt_pass(groups, fixed_noise: bool) -> dict:
    from tti_dist.capture import ActivationCapture
    from tti_dist.config.schema import ModelConfig
    from tti_dist.models.gpt import GPT, lm_loss, tp_partition_dims
    from tti_dist.regularizers import build_regularizers, checked_regularizers
    from tti_dist.utils.seeding import seed_runtime, seed_weights

    cfg = ModelConfig(**GPT_CFG)
    seed_weights(5)
    model = GPT(cfg, groups)
    regs = build_regularizers(checked_regularizers(GPT_ENTRIES, cfg, groups.tp_size), model, groups)
    captures = {hp.name: hp for reg in regs for hp in reg.captures}
    seed_runtime(5, groups.dp_rank)
    bn = model.blocks[0].bottleneck
    if fixed_noise:
        full = torch.randn(GPT_BATCH, GPT_SEQ - 1, cfg.bottleneck_dim, generator=torch.Generator().manual_seed(4))
        local = full.chunk(groups.dp_size, dim=0)[groups.dp_rank].chunk(groups.tp_size, dim=-1)[groups.tp_rank]
        bn.sample_noise = lambda like: local
    tokens = torch.randint(0, cfg.vocab_size, (GPT_BATCH, GPT_SEQ), generator=torch.Generator().manual_seed(9))
    tokens = tokens.chunk(groups.dp_size, dim=0)[groups.dp_rank]
    model.train()
    with ActivationCapture(list(captures.values())) as cap:
        logits = model(tokens[:, :-1])
        losses = {"task": lm_loss(logits, tokens[:, 1:]).mean()}
        metrics = {}
        for reg in regs:
            losses[reg.spec.name], m = reg(cap.captured, step=0)
            metrics.update(m)
        latents = {k.rsplit(".", 1)[1]: _gather_tp(v, groups) for k, v in cap.captured.items()}
        grads = {}
        for name, loss in losses.items():
            model.zero_grad(set_to_none=True)
            loss.backward(retain_graph=True)
            grads[name] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return {"logits": _gather_tp(logits, groups), "values": {k: v.detach() for k, v in losses.items()},
            "metrics": metrics, "latents": latents, "grads": grads, "layout": tp_partition_dims(model),
            "captures": {reg.spec.name: [hp.name for hp in reg.captures] for reg in regs},
            "logvar_bias": _gather_tp(bn.enc_logvar.bias, groups)}


def _rank(tp_size: int) -> dict:
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel

    groups = init_parallel(tp_size, torch.device("cpu"), 120)
    try:
        out = {"tp_rank": groups.tp_rank, "dp_rank": groups.dp_rank, "tp_size": groups.tp_size,
               "dp_size": groups.dp_size, "plain": _plain(groups), "gpt_fixed": _gpt_pass(groups, fixed_noise=True)}
        if groups.dp_size == 1:  # the runtime seed differs per DP rank: only TP layouts compare the real draw
            out["gpt_rng"] = _gpt_pass(groups, fixed_noise=False)
        return out
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def layouts():
    return {"tp1": run_ranks(1, _rank, 1), "tp2": run_ranks(2, _rank, 2), "dp2": run_ranks(2, _rank, 1)}


# ---------------------------------------------------------------- float64 reference

def _reference(key: str, rows: torch.Tensor | None = None):
    """(loss, dloss/dmu, dloss/dlogvar) on the full [B, T, Z] tensors, one process."""
    from tti_dist.metrics.total_correlation import gaussian_log_density, log_importance_weights, total_correlation

    entry = PLAIN_ENTRIES[key]
    full = {k: v.double() for k, v in _plain_tensors().items()}
    mu = full["mu"].clone().requires_grad_(True)
    logvar = full["logvar"].clone().requires_grad_(True)
    z = mu + torch.exp(0.5 * logvar) * full["eps"]
    if entry["type"] == "kl":
        loss = 0.5 * (mu**2 + torch.exp(logvar) - logvar - 1).sum(-1).mean()
    else:
        zf, muf, lvf = (t.reshape(-1, Z) for t in (z, mu, logvar))
        if rows is not None:
            zf, muf, lvf = zf[rows], muf[rows], lvf[rows]
        m = zf.shape[0]
        log_q = gaussian_log_density(zf[:, None], muf[None], lvf[None])
        log_w = log_importance_weights(m, entry.get("dataset_size") or m, entry.get("estimator", "mss"), dtype=torch.float64)
        loss = total_correlation(log_q, log_w).mean()
    loss.backward()
    return loss.detach(), mu.grad, logvar.grad


def _expected_local(grad: torch.Tensor, r: dict) -> torch.Tensor:
    g = grad.chunk(r["dp_size"], dim=0)[r["dp_rank"]].chunk(r["tp_size"], dim=-1)[r["tp_rank"]]
    return (g * r["dp_size"]).float()  # DeepSpeed divides by dp_size afterwards


# ---------------------------------------------------------------- plain tensors

@pytest.mark.parametrize("layout", ["tp1", "tp2", "dp2"])
@pytest.mark.parametrize("key", ["kl", "tc_mss", "tc_mss_n", "tc_mws"])
def test_plain_values_and_gradients_equal_reference(layouts, layout, key):
    loss, g_mu, g_lv = _reference(key)
    coefficient = PLAIN_ENTRIES[key]["coefficient"]
    ranks = layouts[layout]
    values = [r["plain"][key]["metrics"][f"reg/{PLAIN_ENTRIES[key]['name']}/loss"].double() for r in ranks]
    if layout == "dp2":  # what the trainer reports: the mean over DP ranks
        values = [sum(values) / len(values)]
    for v in values:
        torch.testing.assert_close(v, loss, rtol=1e-5, atol=0)
    for r in ranks:
        res = r["plain"][key]
        assert res["idx"] is None
        if r["dp_size"] == 1:
            torch.testing.assert_close(res["weighted"].double(), coefficient * loss, rtol=1e-5, atol=0)
        for got, ref in ((res["grad_mu"], g_mu), (res["grad_logvar"], g_lv)):
            expected = coefficient * _expected_local(ref, r)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    if layout == "dp2":  # DeepSpeed's average of the ranks' contributions, placed at their rows, is DP=1's
        avg = torch.cat([r["plain"][key]["grad_mu"] / 2 for r in ranks], dim=0).double()
        torch.testing.assert_close(avg, coefficient * g_mu, rtol=1e-4, atol=1e-6 * g_mu.abs().max().item())


def test_plain_metrics(layouts):
    import math

    full = _plain_tensors()
    for layout in ("tp1", "tp2", "dp2"):
        for r in layouts[layout]:
            mu = full["mu"].chunk(r["dp_size"])[r["dp_rank"]].double()
            lv = full["logvar"].chunk(r["dp_size"])[r["dp_rank"]].double()
            kl_d = (0.5 * (mu**2 + lv.exp() - lv - 1)).reshape(-1, Z).mean(0)
            assert kl_d[0] < 0.01 and (kl_d[1:] > 0.01).all()  # the data exercise the threshold
            assert r["plain"]["kl"]["metrics"]["reg/kl/active_latents"].item() == Z - 1
            for key, tag in (("tc_mss", "tc_mss"), ("tc_mws", "tc_mws")):
                m = r["plain"][key]["metrics"]
                assert set(m) == {"reg/tc/loss", "reg/tc/coefficient", f"reg/tc/{tag}"}
                assert torch.equal(m[f"reg/tc/{tag}"], m["reg/tc/loss"])
    # mws = uniform-weight (N = M) estimate + (Z - 1) log N, exactly (a constant offset).
    (tp1,) = layouts["tp1"]
    mss_uniform = tp1["plain"]["tc_mss"]["metrics"]["reg/tc/loss"].item()
    mws = tp1["plain"]["tc_mws"]["metrics"]["reg/tc/loss"].item()
    assert mws == pytest.approx(mss_uniform + (Z - 1) * math.log(1000), abs=1e-4)
    torch.testing.assert_close(tp1["plain"]["tc_mws"]["grad_mu"], 2 * tp1["plain"]["tc_mss"]["grad_mu"],
                               rtol=1e-4, atol=1e-7)


def test_captures_add_mu_and_logvar(layouts):
    expected = ["blocks.0.bottleneck.mu", "blocks.0.bottleneck.logvar", "blocks.0.bottleneck.z"]
    for r in layouts["tp2"]:
        assert r["plain"]["kl"]["captures"] == expected
        assert r["gpt_fixed"]["captures"] == {"kl": expected, "tc_mss": expected, "tc_mws": expected}


@pytest.mark.parametrize("layout", ["tp1", "tp2", "dp2"])
def test_sampled_tokens_same_on_tp_ranks_reproducible_and_match_reference(layouts, layout):
    ranks = layouts[layout]
    dp_size = ranks[0]["dp_size"]
    local_n = B * T // dp_size
    by_dp = {}
    for r in ranks:
        res = r["plain"]["tc_sampled"]
        idx = res["idx"]
        assert idx is not None and len(idx) == 5 and len(set(idx.tolist())) == 5
        if r["dp_rank"] in by_dp:
            assert torch.equal(by_dp[r["dp_rank"]], idx)  # same sample on every TP rank of a DP group
        by_dp[r["dp_rank"]] = idx
        assert res["state_after_one"] == {"calls": 1}
        assert not torch.equal(res["idx_call1"], idx)  # the next call draws a new sample
        assert not torch.equal(res["second"], res["weighted"])
        assert torch.equal(res["replayed"], res["weighted"])  # load_state_dict replays call 0's draw
    if dp_size == 2:
        assert not torch.equal(by_dp[0], by_dp[1])  # DP ranks draw different samples
    rows = torch.cat([by_dp[d] + d * local_n for d in range(dp_size)])
    loss, g_mu, g_lv = _reference("tc_sampled", rows=rows)
    values = [r["plain"]["tc_sampled"]["weighted"].double() for r in ranks]
    torch.testing.assert_close(sum(values) / len(values) if dp_size > 1 else values[0], loss, rtol=1e-5, atol=0)
    for r in ranks:
        res = r["plain"]["tc_sampled"]
        for got, ref in ((res["grad_mu"], g_mu), (res["grad_logvar"], g_lv)):
            expected = _expected_local(ref, r)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


# ---------------------------------------------------------------- through the GPT

def _compare_gpt(ref: dict, ranks: list[dict], key: str) -> None:
    tp_size, dp_size = ranks[0]["tp_size"], ranks[0]["dp_size"]
    for name in LOSSES:
        values = [r[key]["values"][name] for r in ranks]
        torch.testing.assert_close(sum(values) / len(values), ref["values"][name], rtol=1e-5, atol=0,
                                   msg=lambda m: f"{name}: {m}")
    compared = set()
    for name in LOSSES:
        scale = max(g.abs().max().item() for g in ref["grads"][name].values())
        assert scale > 0
        for tp_rank in range(tp_size):
            members = [r for r in ranks if r["tp_rank"] == tp_rank]
            layout = members[0][key]["layout"]
            assert all(m[key]["grads"][name].keys() == ref["grads"][name].keys() for m in members), name
            for p in ref["grads"][name]:
                avg = torch.stack([m[key]["grads"][name][p] for m in members]).mean(0)  # DeepSpeed's DP average
                dim = layout[p]
                expected = ref["grads"][name][p] if dim is None else ref["grads"][name][p].chunk(tp_size, dim=dim)[tp_rank]
                torch.testing.assert_close(avg, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name} {p}: {m}")
                compared.add((p, dim))
    bottleneck = {(p, d) for p, d in compared if ".bottleneck." in p}
    assert {"blocks.0.bottleneck.enc_mu.weight", "blocks.0.bottleneck.enc_logvar.weight",
            "blocks.0.bottleneck.dec.weight"} <= {p for p, _ in bottleneck}
    if tp_size > 1:  # the encoders' and decoder's weight slices were compared
        assert ("blocks.0.bottleneck.enc_mu.weight", 0) in bottleneck
        assert ("blocks.0.bottleneck.enc_logvar.weight", 0) in bottleneck
        assert ("blocks.0.bottleneck.dec.weight", 1) in bottleneck
    if dp_size == 1:
        torch.testing.assert_close(ranks[0][key]["logits"], ref["logits"], rtol=1e-5, atol=1e-6)


def test_gpt_tp2_equals_tp1_with_the_same_runtime_noise(layouts):
    (ref,) = layouts["tp1"]
    ranks = layouts["tp2"]
    for r in ranks:
        for site in ("mu", "logvar", "z"):
            torch.testing.assert_close(r["gpt_rng"]["latents"][site], ref["gpt_rng"]["latents"][site],
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"{site}: {m}")
    # Training mode really sampled: z != mu, and the noise came from the shared runtime seed.
    lat = ref["gpt_rng"]["latents"]
    assert (lat["z"] - lat["mu"]).abs().max() > 1e-3
    _compare_gpt(ref["gpt_rng"], ranks, "gpt_rng")


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_gpt_with_fixed_noise_equals_single_process(layouts, layout):
    (ref,) = layouts["tp1"]
    _compare_gpt(ref["gpt_fixed"], layouts[layout], "gpt_fixed")


def test_gpt_reg_values_equal_reference_on_captured_latents(layouts):
    """The GPT's KL and TC values equal the float64 formulas on its captured mu/logvar/z."""
    from tti_dist.metrics.total_correlation import gaussian_log_density, log_importance_weights, total_correlation

    (ref,) = layouts["tp1"]
    res = ref["gpt_rng"]
    mu, lv, z = (res["latents"][s].double().reshape(-1, 8) for s in ("mu", "logvar", "z"))
    kl = 0.5 * (mu**2 + lv.exp() - lv - 1).sum(-1).mean()
    torch.testing.assert_close(res["values"]["kl"].double(), kl, rtol=1e-5, atol=0)
    log_q = gaussian_log_density(z[:, None], mu[None], lv[None])
    m = z.shape[0]
    for name, est, n in (("tc_mss", "mss", m), ("tc_mws", "mws", 10_000)):
        expected = total_correlation(log_q, log_importance_weights(m, n, est, dtype=torch.float64)).mean()
        torch.testing.assert_close(res["values"][name].double(), expected, rtol=1e-5, atol=1e-6)
    # Initialisation: posterior noise starts small (logvar bias -4, zero weight).
    torch.testing.assert_close(lv, torch.full_like(lv, -4.0))
    assert torch.equal(res["logvar_bias"], torch.full((8,), -4.0))
