"""Decorrelation (DeCov): a float64 reference written here; TP=2, DP=2 and TP=2 x DP=2 equal
the single-process global-batch loss, and their gradients (after DeepSpeed-style averaging
over DP) equal the single-process gradients, on plain tensors and through the GPT.

Layouts (Megatron order): world 2 with tp 2 = TP group {0,1}; world 2 with tp 1 = DP group
{0,1}; world 4 with tp 2 = TP groups {0,1},{2,3}, DP groups {0,2},{1,3}.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from spawn import run_ranks

B, T, D_FFN, D_RES = 4, 6, 8, 6
EPS = 1e-5

PLAIN_ENTRIES = {
    "cov": {"type": "decorrelation", "name": "dc", "coefficient": 1.0,
            "hookpoints": ["blocks.0.mlp.act", "blocks.0.resid_post"]},
    "corr": {"type": "decorrelation", "name": "dc", "coefficient": 1.0, "normalize": True, "eps": EPS,
             "hookpoints": ["blocks.0.mlp.act", "blocks.0.resid_post"]},
    "sharded_only": {"type": "decorrelation", "name": "dc", "coefficient": 1.0, "hookpoints": ["blocks.0.mlp.act"]},
    "sampled": {"type": "decorrelation", "name": "dc", "coefficient": 1.0, "normalize": True, "max_tokens": 5,
                "seed": 3, "hookpoints": ["blocks.0.mlp.act", "blocks.0.resid_post"]},
}
SHARDED = {"blocks.0.mlp.act": True, "blocks.0.resid_post": False}

GPT_ENTRY = {"type": "decorrelation", "name": "dc_gpt", "coefficient": 2.0, "normalize": True,
             "hookpoints": ["blocks.*.mlp.act", "blocks.1.resid_post"]}


def _full_acts() -> dict[str, torch.Tensor]:
    """Correlated activations with a nonzero mean (exercises the centring)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dim in (("blocks.0.mlp.act", D_FFN), ("blocks.0.resid_post", D_RES)):
        z = torch.randn(B, T, dim, generator=g, dtype=torch.float64)
        mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.5 + torch.eye(dim, dtype=torch.float64)
        out[name] = (z @ mix + 3.0 + torch.arange(dim, dtype=torch.float64)).float()
    return out


def _toy_model() -> nn.Module:
    from tti_dist.capture.hookpoints import HookPoint

    mlp = nn.Module()
    mlp.hook_act = HookPoint(D_FFN, tp_sharded=True)
    block = nn.Module()
    block.mlp = mlp
    block.hook_resid_post = HookPoint(D_RES, tp_sharded=False)
    model = nn.Module()
    model.blocks = nn.ModuleList([block])
    return model


def _rank(tp_size: int) -> dict:
    from tti_dist.capture import ActivationCapture
    from tti_dist.config.schema import ModelConfig
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT, tp_partition_dims
    from tti_dist.regularizers import build_regularizers, checked_regularizers
    from tti_dist.regularizers import decorrelation  # noqa: F401  (registers the type)
    from tti_dist.utils.seeding import seed_weights

    groups = init_parallel(tp_size, torch.device("cpu"), 120)
    try:
        out = {"tp_rank": groups.tp_rank, "dp_rank": groups.dp_rank, "tp_size": groups.tp_size,
               "dp_size": groups.dp_size, "plain": {}}
        # Plain tensors: this rank's batch rows (DP) and units (TP, sharded sites only).
        cfg_small = ModelConfig(num_layers=1, hidden_size=D_RES, num_heads=2, max_seq_len=16)
        full = _full_acts()
        for key, entry in PLAIN_ENTRIES.items():
            (reg,) = build_regularizers(checked_regularizers([entry], cfg_small), _toy_model(), groups)
            local = {}
            for name in [hp.name for hp in reg.hookpoints]:
                a = full[name].chunk(groups.dp_size, dim=0)[groups.dp_rank]
                if SHARDED[name]:
                    a = a.chunk(groups.tp_size, dim=-1)[groups.tp_rank]
                local[name] = a.clone().requires_grad_(True)
            idx = reg.token_index(B * T // groups.dp_size, 0, torch.device("cpu"))
            weighted, metrics = reg(local, step=0)
            weighted.backward()
            out["plain"][key] = {"weighted": weighted.detach(), "metrics": metrics, "idx": idx,
                                 "grads": {k: v.grad.clone() for k, v in local.items()}}
        # GPT: this DP rank's half of the batch, real captured activations.
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16)
        seed_weights(5)
        model = GPT(cfg, groups)
        (reg,) = build_regularizers(checked_regularizers([GPT_ENTRY], cfg), model, groups)
        tokens = torch.randint(0, cfg.vocab_size, (4, 12), generator=torch.Generator().manual_seed(9))
        tokens = tokens.chunk(groups.dp_size, dim=0)[groups.dp_rank]
        with ActivationCapture(reg.hookpoints) as cap:
            model(tokens)
            weighted, metrics = reg(cap.captured, step=0)
            acts = {k: v.detach().clone() for k, v in cap.captured.items()}
        weighted.backward()
        out["gpt"] = {"weighted": weighted.detach(), "metrics": metrics, "layout": tp_partition_dims(model),
                      "acts": acts,
                      "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}}
        return out
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def layouts():
    return {
        "tp1": run_ranks(1, _rank, 1),
        "tp2": run_ranks(2, _rank, 2),
        "dp2": run_ranks(2, _rank, 1),
        "tp2dp2": run_ranks(4, _rank, 2),
    }


# ---------------------------------------------------------------- reference (float64)

def _ref_site(x: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared and mean absolute off-diagonal covariance (or correlation) of x [N, D]."""
    x = x.double()
    d = x.shape[1]
    xc = x - x.mean(0)
    c = xc.T @ xc / x.shape[0]
    if normalize:
        s = torch.sqrt(torch.diagonal(c) + EPS)
        c = c / torch.outer(s, s)
    off = c - torch.diag(torch.diagonal(c))
    return (off ** 2).sum() / (d * (d - 1)), off.abs().sum() / (d * (d - 1))


def _ref(full: dict[str, torch.Tensor], entry: dict, rows: dict[str, torch.Tensor] | None = None):
    """Loss, metric and gradients w.r.t. the full [B, T, D] activations (DP=1, TP=1)."""
    leaves = {k: v.double().clone().requires_grad_(True) for k, v in full.items() if any(
        p == k for p in entry["hookpoints"])}
    losses, metrics = [], []
    for k, v in leaves.items():
        x = v.reshape(-1, v.shape[-1])
        if rows is not None:
            x = x[rows]
        lo, me = _ref_site(x, entry.get("normalize", False))
        losses.append(lo)
        metrics.append(me)
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.detach(), torch.stack(metrics).mean(), {k: v.grad for k, v in leaves.items()}


def test_reference_matches_numpy_cov_and_decov():
    x = _full_acts()["blocks.0.mlp.act"].reshape(-1, D_FFN).double()
    c = np.cov(x.numpy(), rowvar=False, bias=True)
    d = D_FFN
    decov = 0.5 * (np.sum(c ** 2) - np.sum(np.diag(c) ** 2))  # Cogswell et al.'s normalization
    loss, _ = _ref_site(x, normalize=False)
    assert loss.item() == pytest.approx(decov * 2 / (d * (d - 1)), rel=1e-12)
    r = np.corrcoef(x.numpy(), rowvar=False)
    loss_r, _ = _ref_site(x, normalize=True)
    assert loss_r.item() == pytest.approx((np.sum(r ** 2) - d) / (d * (d - 1)), rel=1e-4)


# ---------------------------------------------------------------- plain tensors

def _expected_local_grad(ref_grad: torch.Tensor, name: str, r: dict) -> torch.Tensor:
    g = ref_grad.chunk(r["dp_size"], dim=0)[r["dp_rank"]]
    if SHARDED[name]:
        g = g.chunk(r["tp_size"], dim=-1)[r["tp_rank"]]
    # DeepSpeed divides by dp_size: the local gradient must be dp_size x the global one.
    return (g * r["dp_size"]).float()


@pytest.mark.parametrize("layout", ["tp1", "tp2", "dp2", "tp2dp2"])
@pytest.mark.parametrize("key", ["cov", "corr", "sharded_only"])
def test_plain_value_and_gradients_equal_reference(layouts, layout, key):
    full = _full_acts()
    loss, metric, grads = _ref(full, PLAIN_ENTRIES[key])
    for r in layouts[layout]:
        res = r["plain"][key]
        assert res["idx"] is None
        torch.testing.assert_close(res["weighted"].double(), loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(res["metrics"]["reg/dc/loss"].double(), loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(res["metrics"]["reg/dc/mean_abs_offdiag"].double(), metric, rtol=1e-5, atol=0)
        assert res["metrics"]["reg/dc/coefficient"].item() == 1.0
        assert res["grads"].keys() == grads.keys()
        for name, g in res["grads"].items():
            expected = _expected_local_grad(grads[name], name, r)
            scale = expected.abs().max().item()
            torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def test_dp_average_of_gradients_equals_single_process(layouts):
    """What DeepSpeed does: the DP-averaged contributions, placed at their rows, equal DP=1."""
    full = _full_acts()
    _, _, grads = _ref(full, PLAIN_ENTRIES["cov"])
    for name in grads:
        pieces = [r["plain"]["cov"]["grads"][name] / r["dp_size"] for r in layouts["dp2"]]
        torch.testing.assert_close(torch.cat(pieces, dim=0).double(), grads[name], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "dp2", "tp2dp2"])
def test_sampled_tokens_match_reference(layouts, layout):
    """max_tokens: each DP rank samples its own tokens (the same on its TP ranks); the loss
    is the reference on the union of the DP ranks' samples."""
    full = _full_acts()
    entry = PLAIN_ENTRIES["sampled"]
    ranks = layouts[layout]
    dp_size = ranks[0]["dp_size"]
    local_n = B * T // dp_size
    by_dp = {}
    for r in ranks:
        idx = r["plain"]["sampled"]["idx"]
        assert idx is not None and len(idx) == 5 and len(set(idx.tolist())) == 5
        if r["dp_rank"] in by_dp:
            assert torch.equal(by_dp[r["dp_rank"]], idx)  # same sample on every TP rank
        by_dp[r["dp_rank"]] = idx
    rows = torch.cat([by_dp[d] + d * local_n for d in range(dp_size)])
    loss, metric, grads = _ref(full, entry, rows=rows)
    for r in ranks:
        res = r["plain"]["sampled"]
        torch.testing.assert_close(res["weighted"].double(), loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(res["metrics"]["reg/dc/mean_abs_offdiag"].double(), metric, rtol=1e-5, atol=0)
        for name, g in res["grads"].items():
            expected = _expected_local_grad(grads[name], name, r)
            torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    if dp_size == 2:
        assert not torch.equal(by_dp[0], by_dp[1])  # DP ranks draw different samples


# ---------------------------------------------------------------- through the GPT

@pytest.mark.parametrize("layout", ["tp2", "dp2", "tp2dp2"])
def test_gpt_parameter_gradients_equal_single_process(layouts, layout):
    (ref,) = layouts["tp1"]
    ref = ref["gpt"]
    ranks = layouts[layout]
    for r in ranks:
        torch.testing.assert_close(r["gpt"]["weighted"], ref["weighted"], rtol=1e-5, atol=0)
    tp_size = ranks[0]["tp_size"]
    scale = max(g.abs().max().item() for g in ref["grads"].values())
    assert scale > 0
    compared_sharded = False
    for tp_rank in range(tp_size):
        members = [r for r in ranks if r["tp_rank"] == tp_rank]
        layout_dims = members[0]["gpt"]["layout"]
        assert members[0]["gpt"]["grads"].keys() == ref["grads"].keys()
        for name in ref["grads"]:
            avg = torch.stack([m["gpt"]["grads"][name] for m in members]).mean(0)  # DeepSpeed's DP average
            dim = layout_dims[name]
            expected = ref["grads"][name] if dim is None else ref["grads"][name].chunk(tp_size, dim=dim)[tp_rank]
            compared_sharded |= dim is not None and tp_size > 1
            # atol relative to the largest gradient anywhere: some true gradients are exactly 0
            # (e.g. the last fc2.bias: a constant shift of resid_post leaves its covariance unchanged).
            torch.testing.assert_close(avg, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    assert compared_sharded or tp_size == 1


def test_gpt_value_equals_reference_on_captured_activations(layouts):
    (ref,) = layouts["tp1"]
    acts = ref["gpt"]["acts"]
    assert sorted(acts) == ["blocks.0.mlp.act", "blocks.1.mlp.act", "blocks.1.resid_post"]
    expected = torch.stack([_ref_site(a.reshape(-1, a.shape[-1]), normalize=True)[0] for a in acts.values()]).mean()
    assert expected.item() > 0
    torch.testing.assert_close(ref["gpt"]["metrics"]["reg/dc_gpt/loss"].double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(ref["gpt"]["weighted"].double(), 2.0 * expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("extra, field", [
    ({"normalise": True}, "regularizers[0].normalise"),
    ({"normalize": "yes"}, "regularizers[0].normalize"),
    ({"max_tokens": 1}, "regularizers[0].max_tokens"),
    ({"max_tokens": 2.5}, "regularizers[0].max_tokens"),
    ({"eps": 0.0}, "regularizers[0].eps"),
    ({"eps": -1e-3}, "regularizers[0].eps"),
    ({"seed": -1}, "regularizers[0].seed"),
])
def test_bad_params_name_the_field(extra, field):
    from tti_dist.config.schema import ModelConfig
    from tti_dist.errors import ConfigError
    from tti_dist.regularizers import checked_regularizers
    from tti_dist.regularizers import decorrelation  # noqa: F401

    entry = {"type": "decorrelation", "name": "dc", "coefficient": 1.0, "hookpoints": ["blocks.0.mlp.act"], **extra}
    with pytest.raises(ConfigError) as exc:
        checked_regularizers([entry], ModelConfig(num_layers=1, hidden_size=8, num_heads=2, max_seq_len=16))
    assert str(exc.value).startswith(field), str(exc.value)


def test_good_params_parse():
    from tti_dist.config.schema import ModelConfig
    from tti_dist.regularizers import checked_regularizers
    from tti_dist.config.regularizers import DecorrelationConfig

    entry = {"type": "decorrelation", "name": "dc", "coefficient": 1.0, "hookpoints": ["blocks.*.mlp.act"],
             "normalize": True, "max_tokens": 256, "seed": 4, "eps": 1e-4}
    (spec,) = checked_regularizers([entry], ModelConfig(num_layers=2, hidden_size=8, num_heads=2, max_seq_len=16))
    assert spec.params == DecorrelationConfig(normalize=True, max_tokens=256, seed=4, eps=1e-4)
