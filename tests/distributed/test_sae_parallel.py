"""The tensor-parallel SAE on 2 real gloo ranks (one spawn), against TP=1 in the test process.

(a) TP=2: the initial weights, the selected latents, latents, x_hat, the reconstruction /
    normalized reconstruction / L1 / AuxK losses and the gradients of every shard equal the
    TP=1 model with the same weights (topk sparse and dense decode, topk with normalized
    inputs and an input that needs a gradient (joint co-training), relu); decoder redundancy
    at TP=2 equals TP=1, with a duplicate direction across the two shards.
(b) DP=2 (the same 2 ranks as data parallel): the firing tracker counts global tokens and
    keeps a latent alive when it fired on either rank; init_b_pre (mean, geometric median),
    explained variance and latent density over DP equal the values on the concatenated samples.
"""

from __future__ import annotations

import pytest
import torch

from spawn import run_ranks

D, N = 12, 64  # input width, latents (32 per rank at TP=2)
VARIANTS = {
    "topk": dict(cfg=dict(k=6, aux_k=3), sparse=True, joint=False),
    "topk_dense": dict(cfg=dict(k=6, aux_k=5), sparse=False, joint=False),
    "topk_norm_joint": dict(cfg=dict(k=40, aux_k=40, normalize_input=True), sparse=True, joint=True),
    "relu": dict(cfg=dict(activation="relu", l1_coefficient=0.3), sparse=False, joint=False),
}
DEAD = torch.zeros(N, dtype=torch.bool)
DEAD[[1, 5, 9, 30, 33, 34, 50, 60, 63]] = True  # on both shards


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(21)
    return torch.randn(3, 7, D, generator=g) + torch.linspace(-0.5, 0.5, D)


def _full_weights() -> dict[str, torch.Tensor]:
    """Deterministic weights of the whole SAE; latent 40's direction duplicates latent 3's (other shard)."""
    g = torch.Generator().manual_seed(5)
    w_dec = torch.randn(D, N, generator=g)
    w_dec[:, 40] = w_dec[:, 3]
    w_dec = w_dec / w_dec.norm(dim=0)
    return {
        "W_dec": w_dec,
        "W_enc": w_dec.t() + 0.2 * torch.randn(N, D, generator=g),
        "b_enc": 0.1 * torch.randn(N, generator=g),
        "b_pre": 0.3 * torch.randn(D, generator=g),
    }


def _gather_last(t: torch.Tensor, group, size: int) -> torch.Tensor:
    import torch.distributed as dist

    if size == 1:
        return t.detach().clone()
    t = t.detach().contiguous()
    pieces = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(pieces, t, group=group)
    return torch.cat(pieces, dim=-1)


def _shard(full: torch.Tensor, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(size, dim=param.partition_dim)[rank]


def run_variant(name: str, tp_group, tp_size: int, tp_rank: int) -> dict:
    """Build the SAE at this TP degree with the shared weights, run forward + losses + backward."""
    from tti_dist.sae import ParallelSAE, SAEConfig, decoder_redundancy

    spec = VARIANTS[name]
    cfg = SAEConfig(num_latents=N, **spec["cfg"])
    sae = ParallelSAE(D, cfg, tp_group, tp_size, tp_rank, seed=3, sparse_decode=spec["sparse"])
    res = {"init_W_dec": _gather_last(sae.W_dec, tp_group, tp_size)}
    with torch.no_grad():
        for pname, full in _full_weights().items():
            p = getattr(sae, pname)
            p.copy_(_shard(full, p, tp_rank, tp_size))
    x = _inputs().requires_grad_(spec["joint"])
    dead = DEAD.chunk(tp_size)[tp_rank]
    out = sae(x)
    mse = sae.reconstruction_loss(out.x_in, out.x_hat)
    mse_norm = sae.reconstruction_loss(out.x_in, out.x_hat, normalize="token")
    l1 = sae.l1_penalty(out)
    aux = sae.aux_k_loss(out.x_in, out, dead)
    total, _ = sae.training_loss(out.x_in, out, dead)
    res.update(
        latents=_gather_last(out.latents, tp_group, tp_size),
        mask=None if out.mask is None else _gather_last(out.mask, tp_group, tp_size),
        x_hat=out.x_hat.detach().clone(),
        losses={"mse": mse.detach(), "mse_norm": mse_norm.detach(), "l1": l1.detach(), "aux": aux.detach(),
                "total": total.detach()},
        redundancy=decoder_redundancy(sae.W_dec, tp_group),
        grads={},
    )
    # gradients of each objective separately (a bug in one path cannot hide behind another)
    for key, loss in (("recon", mse + 0.5 * mse_norm), ("l1", l1), ("aux", aux)):
        sae.zero_grad(set_to_none=False)
        if x.grad is not None:
            x.grad = None
        loss.backward(retain_graph=True)
        res["grads"][key] = {n: p.grad.clone() for n, p in sae.named_parameters()}
        if spec["joint"]:
            res["grads"][key]["x"] = x.grad.clone()
    res["partition"] = {n: getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
                        for n, p in sae.named_parameters()}
    return res


def _dp_samples(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    rows = (5, 9)[rank]
    x = torch.randn(rows, D, generator=g)
    if rank == 1:
        x[0] = 50.0  # an outlier on one rank only
    return x


def _rank() -> dict:
    import os

    from megatron.core import parallel_state as ps

    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.sae import ExplainedVarianceAccumulator, FiringTracker, ParallelSAE, SAEConfig, latent_density

    world = int(os.environ["WORLD_SIZE"])
    groups = init_parallel(world, torch.device("cpu"), 120)
    try:
        out = {"tp_rank": groups.tp_rank, "tp": {}}
        assert groups.tp_size == 2 and groups.dp_size == 1
        for name in VARIANTS:
            out["tp"][name] = run_variant(name, groups.tp_group, groups.tp_size, groups.tp_rank)

        # (b) the same two ranks as DP=2
        ps.destroy_model_parallel()
        groups = init_parallel(1, torch.device("cpu"), 120)
        assert groups.tp_size == 1 and groups.dp_size == 2
        r = groups.dp_rank
        out["dp_rank"] = r
        tracker = FiringTracker(4, dead_window_tokens=10, dp_group=groups.dp_group)
        f = torch.zeros((3, 5)[r], 4)
        f[0, r] = 1.0  # latent 0 fires on rank 0 only, latent 1 on rank 1 only
        tracker.update(f)
        out["since1"] = tracker.tokens_since_fired.tolist()
        f = torch.zeros((2, 1)[r], 4)
        if r == 1:
            f[0, 2] = 2.0
        tracker.update(f)
        out["since2"] = tracker.tokens_since_fired.tolist()
        out["dead2"] = tracker.dead_mask().tolist()
        out["density"] = tracker.density()
        tracker.update(torch.zeros(4, 4))  # 8 more global tokens
        out["dead3"] = tracker.dead_mask().tolist()

        x = _dp_samples(r)
        sae = ParallelSAE(D, SAEConfig(num_latents=8, k=2), seed=0)
        out["b_pre_mean"] = sae.init_b_pre(x, method="mean", dp_group=groups.dp_group)
        out["b_pre_median"] = sae.init_b_pre(x, method="geometric_median", dp_group=groups.dp_group)
        x_hat = 0.8 * x + 0.1
        acc = ExplainedVarianceAccumulator().update(x, x_hat)
        out["ev"] = acc.compute(groups.dp_group)
        out["shrinkage"] = acc.shrinkage(groups.dp_group)
        out["ev_local"] = acc.compute()
        out["latent_density"] = latent_density(torch.relu(x), groups.dp_group)
        return out
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(2, _rank)


@pytest.fixture(scope="module")
def reference():
    return {name: run_variant(name, None, 1, 0) for name in VARIANTS}


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda s: f"{what}: {s}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_equals_tp1_forward_and_losses(ranks, reference, variant):
    ref = reference[variant]
    assert ref["losses"]["aux"] > 0 and ref["losses"]["mse"] > 0
    for r in ranks:
        m = r["tp"][variant]
        assert torch.equal(m["init_W_dec"], ref["init_W_dec"]), "initial weights depend on tp_size"
        if ref["mask"] is not None:
            assert torch.equal(m["mask"], ref["mask"]), "selected latents differ"
            k = VARIANTS[variant]["cfg"]["k"]
            assert torch.equal(m["mask"].sum(-1), torch.full((3, 7), k))
        assert torch.equal(m["latents"] != 0, ref["latents"] != 0)
        _close(m["latents"], ref["latents"], "latents")
        _close(m["x_hat"], ref["x_hat"], "x_hat")
        for key, value in ref["losses"].items():
            _close(m["losses"][key], value, key)
        _close(m["redundancy"], ref["redundancy"], "redundancy")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_equals_tp1_gradients(ranks, reference, variant):
    ref = reference[variant]
    for r in ranks:
        m = r["tp"][variant]
        assert m["partition"] == {"W_enc": 0, "b_enc": 0, "W_dec": 1, "b_pre": None}
        for key, grads in m["grads"].items():
            for name, g in grads.items():
                full = ref["grads"][key][name]
                dim = m["partition"].get(name)
                expected = full if dim is None else full.chunk(2, dim=dim)[r["tp_rank"]]
                _close(g, expected, f"{key} grad of {name}")
        if VARIANTS[variant]["joint"]:
            assert ref["grads"]["recon"]["x"].abs().max() > 0
        assert ref["grads"]["aux"]["b_pre"].abs().max() > 0
        if variant == "relu":
            assert ref["grads"]["l1"]["W_dec"].abs().max() > 0


def test_redundancy_sees_duplicate_across_shards(reference):
    from tti_dist.sae import decoder_redundancy

    w = _full_weights()["W_dec"]
    # latents 3 and 40 (different shards at TP=2) have cosine 1; the value counts them
    assert decoder_redundancy(w).item() == pytest.approx(reference["topk"]["redundancy"].item(), abs=1e-12)
    cos = w.t() @ w
    cos.fill_diagonal_(float("-inf"))
    best = cos.max(dim=1).values
    assert best[3].item() == pytest.approx(1.0, abs=1e-6) and best[40].item() == pytest.approx(1.0, abs=1e-6)
    assert decoder_redundancy(w).item() == pytest.approx(best.mean().item(), abs=1e-6)


def test_firing_tracker_over_dp(ranks):
    for r in ranks:
        # update 1: 3 + 5 global tokens; latent 0 fired on rank 0 only, latent 1 on rank 1 only
        assert r["since1"] == [0, 0, 8, 8]
        # update 2: 2 + 1 tokens; latent 2 fired on rank 1 only
        assert r["since2"] == [3, 3, 0, 11]
        assert r["dead2"] == [False, False, False, True]
        torch.testing.assert_close(r["density"], torch.tensor([1, 1, 1, 0], dtype=torch.float64) / 11)
        assert r["dead3"] == [True, True, False, True]


def test_dp_reductions_equal_concatenated_samples(ranks):
    from tti_dist.sae import ParallelSAE, SAEConfig, explained_variance, latent_density, shrinkage

    x = torch.cat([_dp_samples(0), _dp_samples(1)])
    sae = ParallelSAE(D, SAEConfig(num_latents=8, k=2), seed=0)
    mean = sae.init_b_pre(x, method="mean")
    median = sae.init_b_pre(x, method="geometric_median")
    assert (median - mean).norm() > 1.0  # the outlier moves the mean, not the median
    x_hat = 0.8 * x + 0.1
    for r in ranks:
        torch.testing.assert_close(r["b_pre_mean"], mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["b_pre_median"], median, rtol=1e-5, atol=1e-6)
        assert r["ev"].item() == pytest.approx(explained_variance(x, x_hat).item(), abs=1e-10)
        assert r["shrinkage"].item() == pytest.approx(shrinkage(x, x_hat).item(), abs=1e-10)
        torch.testing.assert_close(r["latent_density"], latent_density(torch.relu(x)))
    assert ranks[0]["ev_local"] != ranks[1]["ev_local"]
