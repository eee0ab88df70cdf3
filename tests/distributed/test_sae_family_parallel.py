"""BatchTopK, JumpReLU and Matryoshka SAEs on 2 real gloo ranks (one spawn) against TP=1 in the test process.

(a) TP=2: latents (gathered), the selection, x_hat, the matryoshka prefix reconstructions,
    every loss and the gradients of every shard of each objective equal the TP=1 SAE with the
    same weights; batchtopk with integer pre-activations full of ties at the k*B-th value
    (sparse decode) and with random ones (dense decode); the running threshold equals
    TP=1's after four training forwards, and the eval form (JumpReLU at that threshold)
    matches; jumprelu with thresholds inside the STE window; matryoshka with a prefix
    spanning the shard boundary.
(b) DP=2 (the same ranks): the threshold is the EMA of the DP-mean of the ranks' batch minima.
"""

from __future__ import annotations

import math

import pytest
import torch

from spawn import run_ranks

D, N = 12, 64  # input width, latents (32 per rank at TP=2)
VARIANTS = {
    "batchtopk_ties": dict(cfg=dict(activation="batchtopk", k=6, aux_k=4, batchtopk_threshold_lr=0.3), sparse=True),
    "batchtopk_dense": dict(cfg=dict(activation="batchtopk", k=3, aux_k=5), sparse=False),
    "jumprelu": dict(cfg=dict(activation="jumprelu", l0_coefficient=0.2, jumprelu_bandwidth=0.5), sparse=True),
    "matryoshka": dict(cfg=dict(activation="matryoshka", k=5, aux_k=3, matryoshka_prefixes=(5, 20, 45, 64)),
                       sparse=True),
}
DEAD = torch.zeros(N, dtype=torch.bool)
DEAD[[1, 5, 9, 30, 33, 34, 50, 60, 63]] = True  # on both shards
THRESHOLD_STEPS = 4


def _inputs(name: str, seed: int = 21) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "batchtopk_ties":  # entries in {-1, 0, 1}: integer pre-activations, many equal
        return torch.randint(-1, 2, (3, 7, D), generator=g).float()
    return torch.randn(3, 7, D, generator=g) + torch.linspace(-0.5, 0.5, D)


def _full_weights(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    w_dec = torch.randn(D, N, generator=g)
    w_dec = w_dec / w_dec.norm(dim=0)
    if name == "batchtopk_ties":
        w_enc = torch.randint(-1, 2, (N, D), generator=g).float()
        w_enc[40] = w_enc[3]  # identical latents on different shards
        return {"W_dec": w_dec, "W_enc": w_enc, "b_enc": torch.zeros(N), "b_pre": torch.zeros(D)}
    out = {"W_dec": w_dec, "W_enc": w_dec.t() + 0.2 * torch.randn(N, D, generator=g),
           "b_enc": 0.1 * torch.randn(N, generator=g), "b_pre": 0.3 * torch.randn(D, generator=g)}
    if name == "jumprelu":
        out["log_threshold"] = torch.log(0.2 + 0.6 * torch.rand(N, generator=g))
    return out


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
    """Build the SAE at this TP degree with the shared weights; forward, losses, gradients, threshold."""
    from tti_dist.sae import ParallelSAE, SAEConfig

    spec = VARIANTS[name]
    cfg = SAEConfig(num_latents=N, **spec["cfg"])
    sae = ParallelSAE(D, cfg, tp_group, tp_size, tp_rank, seed=3, sparse_decode=spec["sparse"])
    with torch.no_grad():
        for pname, full in _full_weights(name).items():
            p = getattr(sae, pname)
            p.copy_(_shard(full, p, tp_rank, tp_size))
    x = _inputs(name)
    dead = DEAD.chunk(tp_size)[tp_rank]
    out = sae(x)
    losses = {"mse": sae.reconstruction_loss(out.x_in, out.x_hat)}
    losses["total"], _ = sae.training_loss(out.x_in, out, dead)
    losses["total_fvu"], _ = sae.training_loss(out.x_in, out, dead, normalize="fvu")
    if cfg.activation == "jumprelu":
        losses["l0"] = sae.l0_penalty(out)
    else:
        losses["aux"] = sae.aux_k_loss(out.x_in, out, dead)
    if cfg.activation == "matryoshka":
        losses["matryoshka"] = sae.matryoshka_loss(out.x_in, out)
    res = {
        "latents": _gather_last(out.latents, tp_group, tp_size),
        "mask": _gather_last(out.mask, tp_group, tp_size),
        "pre": _gather_last(out.pre, tp_group, tp_size),
        "x_hat": out.x_hat.detach().clone(),
        "prefixes": None if out.x_hat_prefixes is None else out.x_hat_prefixes.detach().clone(),
        "losses": {k: v.detach() for k, v in losses.items()},
        "grads": {},
        "partition": {n: getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
                      for n, p in sae.named_parameters()},
    }
    for key, loss in losses.items():  # each objective's gradient separately
        sae.zero_grad(set_to_none=False)
        loss.backward(retain_graph=True)
        res["grads"][key] = {n: p.grad.clone() for n, p in sae.named_parameters()}
    if cfg.activation != "jumprelu":
        thetas = [sae.batchtopk_threshold.clone()]
        with torch.no_grad():
            for step in range(1, THRESHOLD_STEPS):
                sae(_inputs(name, seed=100 + step))
                thetas.append(sae.batchtopk_threshold.clone())
            sae.eval()
            ev = sae(x)
        res.update(thetas=torch.stack(thetas), eval_latents=_gather_last(ev.latents, tp_group, tp_size),
                   eval_x_hat=ev.x_hat.clone())
    return res


def _dp_input(rank: int) -> list[torch.Tensor]:
    return [torch.randn(5 + 3 * rank, D, generator=torch.Generator().manual_seed(300 + 10 * rank + s)) for s in range(2)]


def _dp_sae():
    from tti_dist.sae import ParallelSAE, SAEConfig

    cfg = SAEConfig(num_latents=16, activation="batchtopk", k=2, batchtopk_threshold_lr=0.25)
    return ParallelSAE(D, cfg, seed=7)


def _rank() -> dict:
    import os

    from megatron.core import parallel_state as ps

    from tti_dist.distributed.groups import init_parallel, shutdown_parallel

    world = int(os.environ["WORLD_SIZE"])
    groups = init_parallel(world, torch.device("cpu"), 120)
    try:
        assert groups.tp_size == 2 and groups.dp_size == 1
        out = {"tp_rank": groups.tp_rank,
               "tp": {name: run_variant(name, groups.tp_group, groups.tp_size, groups.tp_rank) for name in VARIANTS}}
        ps.destroy_model_parallel()
        groups = init_parallel(1, torch.device("cpu"), 120)
        assert groups.tp_size == 1 and groups.dp_size == 2
        sae = _dp_sae()
        sae.dp_group = groups.dp_group
        thetas = []
        with torch.no_grad():
            for x in _dp_input(groups.dp_rank):
                sae(x)
                thetas.append(sae.batchtopk_threshold.item())
        out["dp_thetas"] = thetas
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


def test_batchtopk_ties_straddle_the_boundary(reference):
    """The tie variant really has a tie at the k*B-th value that the selection must split."""
    ref = reference["batchtopk_ties"]
    pre, mask = ref["pre"].reshape(-1, N), ref["mask"].reshape(-1, N)
    kb = 6 * pre.shape[0]
    assert int(mask.sum()) == kb
    v = pre[mask].min()
    assert v > 0 and int((pre == v).sum()) > int((mask & (pre == v)).sum()) > 0
    # ties go to the lower latent, then the lower token: the kept ties come first in latent-major order
    tied = (pre == v).t().reshape(-1)
    kept = (mask & (pre == v)).t().reshape(-1)
    assert torch.equal(kept, tied & (tied.cumsum(0) <= int(kept.sum())))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_equals_tp1_forward_losses_and_threshold(ranks, reference, variant):
    ref = reference[variant]
    assert ref["losses"]["mse"] > 0
    for r in ranks:
        m = r["tp"][variant]
        assert torch.equal(m["mask"], ref["mask"]), "selected latents differ"
        assert torch.equal(m["latents"] != 0, ref["latents"] != 0)
        _close(m["latents"], ref["latents"], "latents")
        _close(m["x_hat"], ref["x_hat"], "x_hat")
        if ref["prefixes"] is not None:
            _close(m["prefixes"], ref["prefixes"], "prefix reconstructions")
        for key, value in ref["losses"].items():
            _close(m["losses"][key], value, key)
        if "thetas" in ref:
            assert torch.equal(m["thetas"], ref["thetas"]), "running threshold differs"
            _close(m["eval_latents"], ref["eval_latents"], "eval latents")
            _close(m["eval_x_hat"], ref["eval_x_hat"], "eval x_hat")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_equals_tp1_gradients(ranks, reference, variant):
    ref = reference[variant]
    for r in ranks:
        m = r["tp"][variant]
        expected_dims = {"W_enc": 0, "b_enc": 0, "W_dec": 1, "b_pre": None}
        if variant == "jumprelu":
            expected_dims["log_threshold"] = 0
        assert m["partition"] == expected_dims
        for key, grads in m["grads"].items():
            for name, g in grads.items():
                full = ref["grads"][key][name]
                dim = m["partition"][name]
                _close(g, full if dim is None else full.chunk(2, dim=dim)[r["tp_rank"]], f"{key} grad of {name}")
    if variant == "jumprelu":  # the STE reaches the thresholds from both the reconstruction and the L0 term
        assert ref["grads"]["mse"]["log_threshold"].abs().max() > 0
        assert ref["grads"]["l0"]["log_threshold"].abs().max() > 0
        assert ref["grads"]["l0"]["W_enc"].abs().max() == 0
    else:
        assert ref["grads"]["aux"]["b_pre"].abs().max() > 0


def test_threshold_over_dp(ranks):
    """theta_1 = mean over DP of the batch minima; theta_2 = (1 - lr) theta_1 + lr mean(m_2)."""
    sae = _dp_sae()  # the ranks' SAE, at one DP rank
    mins = []
    for rank in (0, 1):
        step_mins = []
        for x in _dp_input(rank):
            f = sae(x, inference=False).latents.detach()
            step_mins.append(f[f > 0].min().item())
        mins.append(step_mins)
    m1, m2 = (mins[0][0] + mins[1][0]) / 2, (mins[0][1] + mins[1][1]) / 2
    assert mins[0][0] != mins[1][0]
    expected = [m1, 0.75 * m1 + 0.25 * m2]
    for r in ranks:
        assert r["dp_thetas"] == pytest.approx(expected, rel=1e-6)
        assert not math.isclose(r["dp_thetas"][0], mins[0][0])
