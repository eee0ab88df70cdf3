"""The sparse autoencoder at TP=1 in one process (tti_dist.sae): metrics against hand computations,
the decoder constraint, TopK / ReLU / AuxK, b_pre initialisation, the firing tracker, config errors.
No process group is needed: at tp_size = 1 (and without dp_group) nothing communicates."""

from __future__ import annotations

import math

import pytest
import torch

from tti_dist.errors import ConfigError
from tti_dist.sae import (
    ExplainedVarianceAccumulator,
    FiringTracker,
    ParallelSAE,
    SAEConfig,
    ce_loss_recovered,
    dead_fraction,
    decoder_redundancy,
    delta_lm_loss,
    dense_fraction,
    explained_variance,
    kl_score,
    l0,
    latent_density,
    shrinkage,
)
from tti_dist.sae.initialisation import INIT_CHUNK_LATENTS, init_decoder_rows


def _data(rows=64, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g) * torch.linspace(0.5, 2.0, d) + torch.linspace(-1, 1, d)


# ---------------------------------------------------------------- explained variance, shrinkage

def test_ev_mean_predictor_is_zero_and_perfect_is_one():
    x = _data(rows=50).reshape(5, 10, 8)  # leading dims are tokens
    mean = x.reshape(-1, 8).mean(0).expand_as(x)
    assert abs(explained_variance(x, mean).item()) < 1e-6
    assert abs(explained_variance(x, x).item() - 1.0) < 1e-6
    assert explained_variance(x, torch.zeros_like(x)).item() < 0  # worse than the mean


def test_ev_hand_computed():
    # tokens (1,0), (3,2); x_hat (1,1), (3,2): E||x-x_hat||^2 = 0.5, E||x||^2 = 7, ||Ex||^2 = 5 -> EV = 1 - 0.5/2
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])
    assert explained_variance(x, x_hat).item() == pytest.approx(0.75, abs=1e-12)


def test_ev_accumulator_equals_one_shot():
    x = _data(rows=60)
    x_hat = x + 0.3 * _data(rows=60, seed=1)
    acc = ExplainedVarianceAccumulator()
    for a, b in zip(x.split(7), x_hat.split(7)):
        acc.update(a, b)
    assert acc.compute().item() == pytest.approx(explained_variance(x, x_hat).item(), abs=1e-12)
    assert acc.shrinkage().item() == pytest.approx(shrinkage(x, x_hat).item(), abs=1e-12)
    # per-dimension-mean EV: 1 - sum sq err / sum centred sq
    manual = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert acc.compute().item() == pytest.approx(manual.item(), rel=1e-5)


def test_shrinkage_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert shrinkage(x, 0.5 * x).item() == pytest.approx(0.5, abs=1e-12)
    assert shrinkage(x, x).item() == pytest.approx(1.0, abs=1e-12)
    # x_hat (1,1), (0,1): E||x_hat||^2 = (2 + 1)/2, E[x.x_hat] = (1 + 2)/2 -> 1
    assert shrinkage(x, torch.tensor([[1.0, 1.0], [0.0, 1.0]])).item() == pytest.approx(1.0, abs=1e-12)
    # x_hat (2,0), (0,1): (4 + 1)/2 / ((2 + 2)/2) = 1.25
    assert shrinkage(x, torch.tensor([[2.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(1.25, abs=1e-12)


# ---------------------------------------------------------------- redundancy, L0, dead/dense

def test_decoder_redundancy_hand_computed():
    # columns e1, 3 e1 (duplicate, other norm), e2, -e2: max cos 1, 1, 0 (vs e1), 0 -> mean 0.5
    w = torch.tensor([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert decoder_redundancy(w).item() == pytest.approx(0.5, abs=1e-7)
    # e1, e2, (e1+e2)/sqrt2: every latent's max cosine is 1/sqrt2
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert decoder_redundancy(w).item() == pytest.approx(1 / math.sqrt(2), abs=1e-7)
    # e1, -e1: signed cosine -1
    assert decoder_redundancy(torch.tensor([[1.0, -2.0]])).item() == pytest.approx(-1.0, abs=1e-7)
    # blocking does not change the value
    w = torch.randn(6, 37, generator=torch.Generator().manual_seed(3))
    assert decoder_redundancy(w, block_size=5).item() == pytest.approx(decoder_redundancy(w).item(), abs=1e-6)


def test_l0_density_dead_dense():
    f = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert l0(f).item() == pytest.approx(6 / 4)
    density = latent_density(f)
    assert density.tolist() == [0.0, 1.0, 0.25, 0.25]
    assert dead_fraction(density == 0).item() == pytest.approx(0.25)
    assert dense_fraction(density, 0.25).item() == pytest.approx(0.25)
    assert dense_fraction(density, 0.1).item() == pytest.approx(0.75)


def test_ce_recovered_and_delta():
    assert ce_loss_recovered(2.0, 2.0, 7.0) == pytest.approx(1.0)
    assert ce_loss_recovered(2.0, 7.0, 7.0) == pytest.approx(0.0)
    assert ce_loss_recovered(2.0, 3.0, 7.0) == pytest.approx(0.8)
    assert delta_lm_loss(2.0, 2.5) == pytest.approx(0.5)
    assert kl_score(0.0, 4.0) == pytest.approx(1.0) and kl_score(1.0, 4.0) == pytest.approx(0.75)


# ---------------------------------------------------------------- the model

def test_init_unit_norm_tied_and_independent_of_slicing():
    cfg = SAEConfig(num_latents=64, k=4)
    sae = ParallelSAE(8, cfg, seed=5)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert not torch.equal(sae.W_dec, ParallelSAE(8, cfg, seed=6).W_dec)
    assert getattr(sae.W_enc, "partition_dim") == 0 and getattr(sae.W_dec, "partition_dim") == 1
    assert sae.W_enc.tensor_model_parallel and sae.b_enc.tensor_model_parallel
    assert not getattr(sae.b_pre, "tensor_model_parallel", False)
    # a slice crossing a generator-chunk boundary equals the slice of the full draw
    n = 2 * INIT_CHUNK_LATENTS + 100
    full = init_decoder_rows(n, 4, 9, 0, n)
    lo, hi = INIT_CHUNK_LATENTS - 50, 2 * INIT_CHUNK_LATENTS + 30
    assert torch.equal(init_decoder_rows(n, 4, 9, lo, hi), full[lo:hi])


def test_topk_exactly_k_nonnegative_and_sparse_decode_equals_dense():
    cfg = SAEConfig(num_latents=64, k=5)
    x = _data(rows=40).reshape(4, 10, 8)
    sparse = ParallelSAE(8, cfg, seed=2)
    dense = ParallelSAE(8, cfg, seed=2, sparse_decode=False)
    with torch.no_grad():
        for m in (sparse, dense):
            m.b_enc.copy_(torch.linspace(0.1, 0.5, 64))  # every selected pre-activation > 0
    out = sparse(x)
    assert out.latents.shape == (4, 10, 64) and out.x_hat.shape == x.shape
    assert (out.latents >= 0).all()
    assert torch.equal((out.latents != 0).sum(-1), torch.full((4, 10), 5))
    assert torch.equal(out.mask.sum(-1), torch.full((4, 10), 5))
    # the kept latents are the 5 largest pre-activations
    top = out.pre.topk(5, dim=-1).indices
    assert torch.equal(torch.zeros_like(out.mask).scatter_(-1, top, True), out.mask)
    torch.testing.assert_close(out.latents, torch.relu(out.pre) * out.mask)
    ref = dense(x)
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.x_hat, out.latents @ sparse.W_dec.t() + sparse.b_pre, rtol=1e-6, atol=1e-6)
    (sparse.reconstruction_loss(x, out.x_hat)).backward()
    (dense.reconstruction_loss(x, ref.x_hat)).backward()
    for a, b in zip(sparse.parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_reconstruction_losses_and_normalize_input():
    x = _data(rows=12)
    x_hat = 0.9 * x
    assert ParallelSAE.reconstruction_loss(x, x_hat).item() == pytest.approx(
        ((x - x_hat) ** 2).sum(1).mean().item(), rel=1e-6)
    assert ParallelSAE.reconstruction_loss(x, x_hat, normalize="token").item() == pytest.approx(0.01, rel=1e-5)
    # Lai et al.: mean ||x - x_hat||^2 / mean ||x||; with x_hat = 0.9 x that is 0.01 E||x||^2 / E||x||,
    # which doubles when x doubles (not scale-free, unlike fvu and token).
    norms = x.norm(dim=1)
    lai = ParallelSAE.reconstruction_loss(x, x_hat, normalize="input_norm").item()
    assert lai == pytest.approx(0.01 * (norms ** 2).mean().item() / norms.mean().item(), rel=1e-5)
    assert ParallelSAE.reconstruction_loss(2 * x, 2 * x_hat, normalize="input_norm").item() == pytest.approx(
        2 * lai, rel=1e-5)
    with pytest.raises(ValueError, match="allowed: fvu, token, none, input_norm"):
        ParallelSAE.reconstruction_loss(x, x_hat, normalize="l2")
    sae = ParallelSAE(8, SAEConfig(num_latents=16, k=2, normalize_input=True))
    out = sae(3.0 * x + 5.0)
    torch.testing.assert_close(out.x_in.mean(-1), torch.zeros(12), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.x_in.norm(dim=-1), torch.ones(12))


def test_relu_l1_weighted_by_decoder_norms():
    cfg = SAEConfig(num_latents=16, activation="relu", l1_coefficient=0.3)
    sae = ParallelSAE(8, cfg, seed=1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, 16))  # non-unit columns
        sae.b_enc.fill_(0.1)
    x = _data(rows=20)
    out = sae(x)
    assert out.mask is None
    f = torch.relu((x - sae.b_pre) @ sae.W_enc.t() + sae.b_enc)
    torch.testing.assert_close(out.latents, f)
    manual = (f * sae.W_dec.norm(dim=0)).sum(1).mean()
    torch.testing.assert_close(sae.l1_penalty(out), manual)
    total, parts = sae.training_loss(x, out)
    torch.testing.assert_close(total, ((x - out.x_hat) ** 2).sum(1).mean() + 0.3 * manual)
    assert set(parts) == {"mse", "l1"}


def test_decoder_stays_unit_norm_and_projected_gradient_is_orthogonal():
    cfg = SAEConfig(num_latents=32, k=4)
    sae = ParallelSAE(8, cfg, seed=3)
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    x = _data(rows=64)
    for _ in range(5):
        out = sae(x)
        opt.zero_grad()
        sae.reconstruction_loss(x, out.x_hat).backward()
        raw = sae.W_dec.grad.clone()
        sae.remove_parallel_gradient()
        g, w = sae.W_dec.grad, sae.W_dec.detach()
        assert (g * w).sum(0).abs().max().item() < 1e-6  # orthogonal to each column
        torch.testing.assert_close(g, raw - w * (raw * w).sum(0))  # g - (g.w) w
        assert raw.abs().max() > 1e-3
        opt.step()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(32), rtol=0, atol=1e-6)


def test_aux_k_loss_formula_and_zero_without_dead():
    cfg = SAEConfig(num_latents=32, k=3, aux_k=4)
    sae = ParallelSAE(8, cfg, seed=4)
    x = _data(rows=30)
    out = sae(x)
    assert sae.aux_k_loss(x, out, torch.zeros(32, dtype=torch.bool)).item() == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    loss = sae.aux_k_loss(x, out, dead)
    # reference: top-4 pre among dead latents, ReLU, decode, FVU of the detached residual
    key = out.pre.detach().masked_fill(~dead, float("-inf"))
    sel = torch.zeros_like(dead.expand_as(key)).scatter(-1, key.topk(4, dim=-1).indices, True)
    e = (x - out.x_hat).detach()
    e_hat = (torch.relu(out.pre) * sel) @ sae.W_dec.t()
    ref = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    torch.testing.assert_close(loss, ref)
    # Lai et al.'s normalisation of the aux term: mean_t ||e - e_hat||^2 / mean_t ||x||
    lai = sae.aux_k_loss(x, out, dead, normalize="input_norm")
    torch.testing.assert_close(lai, ((e - e_hat) ** 2).sum(1).mean() / x.norm(dim=1).mean())
    loss.backward()
    assert sae.W_dec.grad[:, ~dead].abs().max() == 0  # only dead latents learn from AuxK
    assert sae.W_dec.grad[:, dead].abs().max() > 0
    # fewer dead latents than aux_k: all of them, never an alive one
    dead2 = torch.zeros(32, dtype=torch.bool)
    dead2[[1, 7]] = True
    sae.zero_grad()
    sae.aux_k_loss(x, sae(x), dead2).backward()
    assert sae.W_dec.grad[:, ~dead2].abs().max() == 0


def test_aux_k_revives_dead_latents():
    d, n = 8, 32
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(16, d, generator=g)
    x = (torch.rand(256, 16, generator=g) * (torch.rand(256, 16, generator=g) < 0.2)) @ feats
    dead_ids = list(range(24, 32))

    def train(aux_coefficient):
        cfg = SAEConfig(num_latents=n, k=4, aux_k=8, aux_coefficient=aux_coefficient, dead_window_tokens=256)
        sae = ParallelSAE(d, cfg, seed=1)
        sae.init_b_pre(x, method="mean")
        with torch.no_grad():
            sae.W_enc[dead_ids] *= 0.01  # small pre-activations: they never win the top-k
        assert not sae(x).latents[:, dead_ids].any()
        tracker = FiringTracker(n, cfg.dead_window_tokens)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for _ in range(40):
            out = sae(x)
            tracker.update(out.latents)
            loss, _ = sae.training_loss(out.x_in, out, tracker.dead_mask())
            opt.zero_grad()
            loss.backward()
            sae.remove_parallel_gradient()
            opt.step()
            sae.normalize_decoder()
        return int((sae(x).latents[:, dead_ids] != 0).any(0).sum())

    without, with_aux = train(0.0), train(1 / 32)
    assert without == 0
    assert with_aux >= 2 and with_aux > without


# ---------------------------------------------------------------- b_pre, tracker, config

def test_geometric_median_vs_mean():
    # symmetric points plus an outlier: by symmetry the median is (t, t), pulled only slightly
    pts = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [100.0, 100.0]])
    sae = ParallelSAE(2, SAEConfig(num_latents=4, k=1))
    mean = sae.init_b_pre(pts, method="mean")
    torch.testing.assert_close(mean, pts.mean(0))
    med = sae.init_b_pre(pts).double()  # cfg default: geometric_median, 32 Weiszfeld iterations
    assert torch.equal(sae.b_pre.detach(), med.float())
    assert med[0] == med[1] and med.norm() < 0.5 < 20 < mean.norm()  # robust to the outlier
    # optimality (the median is not a data point): the unit vectors to the points sum to 0
    diff = med - pts.double()
    assert (diff / diff.norm(dim=1, keepdim=True)).sum(0).norm() < 1e-5
    obj = lambda y: (pts.double() - y).norm(dim=1).sum()
    for delta in ([1e-3, 0], [0, 1e-3], [-1e-3, 0], [0, -1e-3]):
        assert obj(med) < obj(med + torch.tensor(delta, dtype=torch.float64))
    # a median at a data point: at (0.5, 0.5) the other points' unit vectors sum to norm 0.79 < 1
    pts2 = torch.cat([pts[:4], torch.tensor([[0.5, 0.5]]), pts[4:]])
    torch.testing.assert_close(sae.init_b_pre(pts2, num_iters=100), torch.tensor([0.5, 0.5]), rtol=0, atol=1e-4)
    assert sae.init_b_pre(pts, method="zeros").abs().sum() == 0


def test_firing_tracker_window_and_state():
    tr = FiringTracker(3, dead_window_tokens=10)
    f = torch.zeros(4, 3)
    f[0, 0] = 1.0
    tr.update(f)  # latent 0 fired; 4 tokens
    assert tr.tokens_since_fired.tolist() == [0, 4, 4]
    tr.update(torch.zeros(2, 3, 3))  # 6 tokens
    assert tr.tokens_since_fired.tolist() == [6, 10, 10]
    assert tr.dead_mask().tolist() == [False, True, True]
    g = torch.zeros(5, 3)
    g[2, 2] = 0.5
    tr.update(g)
    assert tr.tokens_since_fired.tolist() == [11, 15, 0]
    assert tr.dead_mask().tolist() == [True, True, False]
    torch.testing.assert_close(tr.density(), torch.tensor([1 / 15, 0.0, 1 / 15], dtype=torch.float64))
    other = FiringTracker(3, dead_window_tokens=10)
    other.load_state_dict(tr.state_dict())
    assert torch.equal(other.tokens_since_fired, tr.tokens_since_fired) and int(other.num_tokens) == 15
    tr.reset_density()
    assert int(tr.num_tokens) == 0 and tr.dead_mask().tolist() == [True, True, False]


@pytest.mark.parametrize("kwargs, tp, match", [
    (dict(num_latents=30), 4, "sae.num_latents: 30 must be divisible by tp_size 4"),
    (dict(num_latents=16, k=17), 1, "sae.k: 17"),
    (dict(activation="gelu"), 1, "sae.activation: 'gelu'"),
    (dict(aux_k=0), 1, "sae.aux_k: 0"),
    (dict(b_pre_init="median"), 1, "sae.b_pre_init: 'median'"),
    (dict(dead_window_tokens=0), 1, "sae.dead_window_tokens: 0"),
])
def test_config_errors(kwargs, tp, match):
    with pytest.raises(ConfigError, match=match):
        SAEConfig(**kwargs).validate(8, tp)


def test_aux_k_default_is_half_width():
    assert SAEConfig(num_latents=4096, aux_k=None).resolved_aux_k(768) == 384
    assert SAEConfig(num_latents=100, aux_k=256).resolved_aux_k(768) == 100
