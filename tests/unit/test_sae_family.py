"""BatchTopK, JumpReLU and Matryoshka SAEs at TP=1 (no process group): closed forms and training.

BatchTopK keeps exactly k*B latents of a batch (not k per token) and its eval form is the
JumpReLU at the running threshold; the JumpReLU straight-through gradients equal the paper's
formulas on a hand-computed example; the Matryoshka loss is the sum of the prefix losses from
dense matmuls; the thresholds survive state_dict; each new activation trains (EV rises) with
the optimizer step `tti sae fit` and co-training use; config errors are one line naming the field.
"""

from __future__ import annotations

import pytest
import torch

from tti_dist.config.sae import SAEConfig
from tti_dist.errors import ConfigError
from tti_dist.sae import ParallelSAE, explained_variance
from tti_dist.sae.activations import TPShard, jumprelu, jumprelu_l0, prefix_slices
from tti_dist.sae.optimizer_step import sae_optimizer_step


def test_batchtopk_keeps_k_times_batch_latents():
    cfg = SAEConfig(num_latents=32, activation="batchtopk", k=4)
    sae = ParallelSAE(8, cfg, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: exactly k*B nonzeros
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    out = sae(x)
    f = out.latents.reshape(10, 32)
    assert int((f != 0).sum()) == 4 * 10 and int(out.mask.sum()) == 40
    per_token = (f != 0).sum(-1)
    assert per_token.min() < 4 < per_token.max()  # a batch budget, not k per token
    pre = out.pre.detach().reshape(-1)
    top = torch.topk(pre, 40).indices
    expected = torch.zeros_like(pre, dtype=torch.bool)
    expected[top] = True
    assert torch.equal(expected, (f != 0).reshape(-1))
    torch.testing.assert_close(f.reshape(-1)[top], pre[top])


def test_batchtopk_sparse_decode_equals_dense_and_eval_is_jumprelu():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    outs, grads = [], []
    for sparse in (True, False):
        sae = ParallelSAE(8, SAEConfig(num_latents=32, activation="batchtopk", k=3), seed=4, sparse_decode=sparse)
        out = sae(x)
        sae.reconstruction_loss(out.x_in, out.x_hat).backward()
        outs.append(out.x_hat.detach())
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    # eval: f = pre * 1[pre > theta] with the running threshold (set by the training forward above)
    assert sae.batchtopk_threshold.item() > 0
    sae.eval()
    out = sae(x)
    th = sae.batchtopk_threshold.item()
    pre = out.pre.detach()
    torch.testing.assert_close(out.latents, torch.where(pre > th, pre, torch.zeros(())))
    # state_dict keeps the threshold: a fresh SAE loading it reproduces the eval output
    fresh = ParallelSAE(8, SAEConfig(num_latents=32, activation="batchtopk", k=3), seed=9, sparse_decode=False)
    fresh.load_state_dict(sae.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x).x_hat, out.x_hat)


def test_threshold_running_estimate():
    """theta_1 = the first batch's smallest positive selected activation; then an EMA with rate lr."""
    sae = ParallelSAE(8, SAEConfig(num_latents=16, activation="batchtopk", k=2, batchtopk_threshold_lr=0.1), seed=2)
    assert sae.batchtopk_threshold.item() == -1.0  # unset; eval then is a plain ReLU
    x1, x2 = torch.randn(5, 8), torch.randn(7, 8)
    sae.eval()
    pre = sae(x1).pre.detach()
    torch.testing.assert_close(sae(x1).latents, torch.relu(pre))
    sae.train()
    f1 = sae(x1).latents.detach()
    m1 = f1[f1 > 0].min().item()
    assert sae.batchtopk_threshold.item() == pytest.approx(m1, rel=1e-7)
    f2 = sae(x2).latents.detach()
    m2 = f2[f2 > 0].min().item()
    assert sae.batchtopk_threshold.item() == pytest.approx(0.9 * m1 + 0.1 * m2, rel=1e-7)
    assert sae.batchtopk_threshold.dtype == torch.float64 and "batchtopk_threshold" in sae.state_dict()


def test_jumprelu_ste_gradients_hand_computed():
    """theta = (0.5, 0.5, 0.6), eps = 0.1, K(u) = 1[|u| < 1/2]:
    d/dtheta_i sum_t w_ti f_ti = -(theta_i/eps) sum_t K((z_ti - theta_i)/eps) w_ti,
    d/dtheta_i mean_t sum_i H(z_ti - theta_i) = -(1/eps) sum_t K(...) / T (Rajamanoharan et al. 2024)."""
    z = torch.tensor([[0.48, 0.9, 0.58], [0.53, 0.2, 0.7]], requires_grad=True)
    log_theta = torch.log(torch.tensor([0.5, 0.5, 0.6])).requires_grad_(True)
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    f = jumprelu(z, log_theta, 0.1)
    torch.testing.assert_close(f.detach(), torch.tensor([[0.0, 0.9, 0.0], [0.53, 0.0, 0.7]]))
    (f * w).sum().backward()
    # latent 0: both tokens in the window: -(0.5/0.1)(1 + 4) = -25; latent 1: none; latent 2: token 0: -(0.6/0.1) 3 = -18
    d_theta = torch.tensor([-25.0, 0.0, -18.0])
    torch.testing.assert_close(log_theta.grad, d_theta * torch.tensor([0.5, 0.5, 0.6]))  # chain rule through exp
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, 2.0, 0.0], [4.0, 0.0, 6.0]]))  # H(z - theta) w
    z.grad, log_theta.grad = None, None
    l0 = jumprelu_l0(z, log_theta, 0.1, TPShard())
    assert l0.item() == pytest.approx(1.5)  # (1 + 2) / 2 tokens
    l0.backward()
    torch.testing.assert_close(log_theta.grad, torch.tensor([-10.0, 0.0, -5.0]) * torch.tensor([0.5, 0.5, 0.6]))
    assert z.grad is None  # the L0 term trains only the thresholds


def test_jumprelu_sae_loss_and_threshold_parameter():
    cfg = SAEConfig(num_latents=16, activation="jumprelu", l0_coefficient=0.25, jumprelu_init_threshold=0.2)
    sae = ParallelSAE(8, cfg, seed=3)
    assert torch.allclose(sae.log_threshold.exp(), torch.full((16,), 0.2))
    assert sae.log_threshold.tensor_model_parallel and sae.log_threshold.partition_dim == 0
    x = torch.randn(4, 8)
    out = sae(x)
    pre = out.pre.detach()
    torch.testing.assert_close(out.latents.detach(), torch.where(pre > 0.2, pre, torch.zeros(())))
    total, parts = sae.training_loss(out.x_in, out)
    l0 = (pre > 0.2).sum(-1).float().mean()
    assert parts["l0_penalty"].item() == pytest.approx(l0.item())
    assert total.item() == pytest.approx(parts["mse"].item() + 0.25 * l0.item(), rel=1e-6)


def test_matryoshka_loss_is_sum_of_prefix_losses():
    prefixes = (3, 10, 16)
    cfg = SAEConfig(num_latents=16, activation="matryoshka", k=4, matryoshka_prefixes=prefixes)
    sae = ParallelSAE(8, cfg, seed=5)
    with torch.no_grad():
        sae.b_pre.copy_(0.3 * torch.randn(8))
    x = torch.randn(2, 3, 8)
    out = sae(x)
    f = out.latents.detach().reshape(6, 16)
    xs = out.x_in.reshape(6, 8)
    w = sae.W_dec.detach()
    by_hand = []
    for m in prefixes:
        x_hat = f[:, :m] @ w[:, :m].t() + sae.b_pre.detach()
        by_hand.append((xs - x_hat).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.x_hat_prefixes.reshape(3, 6, 8)[-1], out.x_hat.reshape(6, 8))
    torch.testing.assert_close(out.x_hat_prefixes[0].reshape(6, 8), f[:, :3] @ w[:, :3].t() + sae.b_pre.detach())
    total, parts = sae.training_loss(out.x_in, out)
    assert total.item() == pytest.approx(sum(v.item() for v in by_hand), rel=1e-6)
    assert parts["mse"].item() == pytest.approx(by_hand[-1].item(), rel=1e-6)
    assert parts["matryoshka_inner"].item() == pytest.approx((by_hand[0] + by_hand[1]).item(), rel=1e-6)
    assert sae.matryoshka_loss(out.x_in, out).item() == pytest.approx(total.item(), rel=1e-6)
    assert int((f != 0).sum()) <= 4 * 6


def test_prefix_slices_across_shards():
    # prefixes 5 < 20 < 45 < 64 over two shards of 32: group [20, 45) spans both
    assert prefix_slices((5, 20, 45, 64), 0, 32) == [(0, 5), (5, 20), (20, 32), (32, 32)]
    assert prefix_slices((5, 20, 45, 64), 32, 32) == [(0, 0), (0, 0), (0, 13), (13, 32)]


@pytest.mark.parametrize("cfg", [
    SAEConfig(num_latents=64, activation="batchtopk", k=3),
    SAEConfig(num_latents=64, activation="jumprelu", l0_coefficient=3e-3, jumprelu_bandwidth=0.05,
              jumprelu_init_threshold=0.05),
    SAEConfig(num_latents=64, activation="matryoshka", k=3, matryoshka_prefixes=(8, 24, 64)),
], ids=lambda c: c.activation)
def test_new_activations_train(cfg):
    """100 steps of the SAE optimizer step (`tti sae fit`'s and co-training's) on sparse
    combinations of 48 directions in R^16: EV from below 0 to above 0.5 (eval form)."""
    dirs = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    dirs /= dirs.norm(dim=1, keepdim=True)

    def batch(g, tokens=128):
        c = (torch.rand(tokens, 48, generator=g) < 0.06) * torch.rand(tokens, 48, generator=g) * 2
        return c @ dirs

    sae = ParallelSAE(16, cfg, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    sae.init_b_pre(batch(g))
    held_out = batch(torch.Generator().manual_seed(99), 512)
    with torch.no_grad():
        out = sae(held_out, inference=False)
        ev_before = explained_variance(out.x_in, out.x_hat).item()
        l0_before = (out.latents != 0).sum(-1).float().mean().item()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a loaded machine
    try:
        for _ in range(100):
            out = sae(batch(g))
            loss, _ = sae.training_loss(out.x_in, out, normalize="fvu")
            loss.backward()
            sae_optimizer_step(sae, opt, None, 1)
    finally:
        torch.set_num_threads(threads)
    sae.eval()
    with torch.no_grad():
        out = sae(held_out)
    ev = explained_variance(out.x_in, out.x_hat).item()
    assert ev_before < 0 and ev > 0.4, (ev_before, ev)
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(64), atol=1e-5)
    if cfg.activation == "jumprelu":  # the L0 term lowered the L0
        assert (out.latents != 0).sum(-1).float().mean().item() < 0.7 * l0_before
    else:
        assert sae.batchtopk_threshold.item() > 0


@pytest.mark.parametrize("kwargs, field, value", [
    (dict(activation="batchtopk", k=0), "k", "0"),
    (dict(activation="matryoshka", k=2, num_latents=16), "matryoshka_prefixes", "[]"),
    (dict(activation="matryoshka", k=2, num_latents=16, matryoshka_prefixes=(4, 4, 16)), "matryoshka_prefixes",
     "[4, 4, 16]"),
    (dict(activation="matryoshka", k=2, num_latents=16, matryoshka_prefixes=(4, 12)), "matryoshka_prefixes",
     "[4, 12]"),
    (dict(activation="matryoshka", k=2, num_latents=16, matryoshka_prefixes=(0, 16)), "matryoshka_prefixes",
     "[0, 16]"),
    (dict(activation="topk", k=2, num_latents=16, matryoshka_prefixes=(4, 16)), "matryoshka_prefixes", "[4, 16]"),
    (dict(activation="jumprelu", jumprelu_bandwidth=0.0), "jumprelu_bandwidth", "0.0"),
    (dict(activation="jumprelu", jumprelu_init_threshold=-1.0), "jumprelu_init_threshold", "-1.0"),
    (dict(activation="jumprelu", l0_coefficient=-1.0), "l0_coefficient", "-1.0"),
    (dict(activation="batchtopk", batchtopk_threshold_lr=1.5), "batchtopk_threshold_lr", "1.5"),
    (dict(activation="batchtopk_v2"), "activation", "'batchtopk_v2'"),
])
def test_config_errors_are_one_line(kwargs, field, value):
    with pytest.raises(ConfigError) as exc:
        SAEConfig(**kwargs).validate(8, 1, "regularizers[0]")
    msg = str(exc.value)
    assert msg.startswith(f"regularizers[0].{field}: {value}") and "\n" not in msg
    if field == "activation":
        assert "'batchtopk', 'jumprelu', 'matryoshka'" in msg
    if field == "matryoshka_prefixes" and kwargs["activation"] == "matryoshka":
        assert "ending at num_latents (16)" in msg


def test_k_is_not_checked_for_jumprelu():
    SAEConfig(num_latents=16, activation="jumprelu", k=99).validate(8, 2)


def test_fit_plan_activation_checks_and_names():
    from tti_dist.sae.fit_plan import prepare_fit, shape_tag

    with pytest.raises(ConfigError, match=r"^--activation: 'gelu'; allowed: topk, relu, batchtopk, jumprelu, "):
        prepare_fit("no-such-run", "blocks.0.resid_post", 64, 4, activation="gelu")
    with pytest.raises(ConfigError, match=r"^sae_options: 'lr' is not a settable SAE field; allowed: "):
        prepare_fit("no-such-run", "blocks.0.resid_post", 64, 4, activation="jumprelu", sae_options={"lr": 1.0})
    assert shape_tag(64, 4) == "n64-k4"  # TopK keeps the names of earlier versions
    assert shape_tag(64, 4, "batchtopk") == "n64-batchtopk-k4"
    assert shape_tag(64, 4, "jumprelu") == "n64-jumprelu"
