"""Transcoders (tti_dist/sae/transcoder.py) at TP=1: closed forms of y_hat (skip term, no
input-side bias, sparsify's initialisation), the FVU and CE-recovered definitions on
hand-made numbers, the replacement metrics against hand-placed hooks on a GPT, the
co-training regularizer's joint gradient, one-line config errors, and a transcoder that
learns a small MLP in well under 2 s."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

D, N = 6, 16


def _tc(**kw):
    from tti_dist.sae import SAEConfig
    from tti_dist.sae.transcoder import ParallelTranscoder

    cfg = kw.pop("cfg", None) or SAEConfig(num_latents=N, activation="topk", k=3)
    return ParallelTranscoder(D, cfg, seed=1, **kw)


def test_skip_term_and_decoder_closed_form():
    """W_dec = 0 (the initialisation) and W_skip = A, b_dec = c: y_hat = A x + c exactly, so a
    linear map y = A x + c is transcoded with FVU 0; with a decoder, y_hat = W_dec f + c + A x
    with f = ReLU of each token's top-3 of W_enc x + b_enc."""
    tc = _tc(skip=True)
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(D, D, generator=g), torch.randn(D, generator=g)
    x = torch.randn(2, 5, D, generator=g)
    assert torch.equal(tc.W_dec, torch.zeros(D, N)) and torch.equal(tc.W_skip, torch.zeros(D, D))
    with torch.no_grad():
        tc.W_skip.copy_(a)
        tc.b_dec.copy_(c)
    y = x @ a.t() + c
    out = tc(x)
    torch.testing.assert_close(out.x_hat, y)
    assert tc.reconstruction_loss(y, out.x_hat, "fvu").item() < 1e-10
    with torch.no_grad():
        tc.W_dec.copy_(torch.randn(D, N, generator=g))
        tc.b_enc.copy_(torch.randn(N, generator=g))
    out = tc(x)
    pre = x @ tc.W_enc.t() + tc.b_enc  # no b_dec subtracted before encoding
    top = torch.topk(pre, 3, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top)).relu()
    torch.testing.assert_close(out.latents, f)
    torch.testing.assert_close(out.x_hat, f @ tc.W_dec.t() + c + x @ a.t())


def test_without_skip_and_unit_decoder():
    tc = _tc(normalize_decoder=True)
    assert not hasattr(tc, "W_skip")
    torch.testing.assert_close(tc.W_dec.norm(dim=0), torch.ones(N))
    x = torch.randn(4, D)
    out = tc(x)
    torch.testing.assert_close(out.x_hat, out.latents @ tc.W_dec.t() + tc.b_dec)
    out.x_hat.pow(2).sum().backward()
    tc.remove_parallel_gradient()  # active with normalize_decoder: each column's gradient orthogonal to it
    assert (tc.W_dec.grad * tc.W_dec).sum(0).abs().max() < 1e-6 * tc.W_dec.grad.abs().max() * D
    plain = _tc()
    plain.W_dec.data.fill_(2.0)
    plain.normalize_decoder()  # sparsify's transcoders: unconstrained decoder
    assert torch.equal(plain.W_dec, torch.full((D, N), 2.0))


def test_init_biases_centre_the_encoder_and_set_b_dec():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, D, generator=g) + 2.0, torch.randn(50, D, generator=g) - 1.0
    from tti_dist.sae import SAEConfig

    tc = _tc(skip=True, cfg=SAEConfig(num_latents=N, activation="relu", b_pre_init="mean"))
    tc.init_biases(x, y)
    # the scales put E||x|| and E||y|| at sqrt(d); b_dec is the scaled target's mean
    assert tc.input_scale.item() == pytest.approx(D ** 0.5 / x.norm(dim=1).mean().item(), rel=1e-5)
    assert tc.target_scale.item() == pytest.approx(D ** 0.5 / y.norm(dim=1).mean().item(), rel=1e-5)
    torch.testing.assert_close(tc.b_dec.detach() / tc.target_scale, y.mean(0))
    torch.testing.assert_close(tc(x).pre.mean(0), torch.zeros(N), atol=1e-5, rtol=0)  # centred pre-activations
    # At initialisation y_hat = b_dec = mean y: FVU exactly 1.
    assert tc.reconstruction_loss(y, tc(x).x_hat, "fvu").item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(TypeError, match="init_biases"):
        tc.init_b_pre(x)


def test_fvu_and_ce_recovered_definitions():
    """FVU = sum ||y - y_hat||^2 / sum ||y - mean y||^2 = 1 - EV; CE recovered =
    (CE_zero - CE_spliced) / (CE_zero - CE_clean)."""
    from tti_dist.sae import ParallelSAE, ce_loss_recovered, explained_variance

    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    y_hat = torch.tensor([[1.0, 2.0], [3.0, 4.0], [3.0, 4.0]])  # error (2, 2) on the last token
    assert ParallelSAE.reconstruction_loss(y, y_hat, "fvu").item() == pytest.approx(8 / 16)
    assert explained_variance(y, y_hat).item() == pytest.approx(0.5)
    assert ce_loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert ce_loss_recovered(2.0, 4.0, 4.0) == 0.0 and ce_loss_recovered(2.0, 2.0, 4.0) == 1.0


def _gpt(groups):
    from tti_dist.config.schema import ModelConfig
    from tti_dist.models.gpt import GPT
    from tti_dist.utils.seeding import seed_weights

    seed_weights(0)
    return GPT(ModelConfig(num_layers=2, hidden_size=D * 4, num_heads=4, max_seq_len=16), groups)


def test_replacement_metrics_against_hand_placed_hooks(groups):
    """ce_spliced = the CE of a forward whose blocks.1.mlp.out is y_hat(blocks.1.resid_mid of
    the same forward); ce_zero = the CE with mlp.out zeroed; a zero transcoder scores CE
    recovered 0; fvu = 1 - EV of the MLP's output."""
    from tti_dist.capture.hookpoints import list_hookpoints
    from tti_dist.sae import SAEConfig, explained_variance
    from tti_dist.sae.splice import METRIC_NAMES, transcoder_splice_metrics
    from tti_dist.sae.transcoder import ParallelTranscoder

    model = _gpt(groups)
    d = model.cfg.hidden_size
    batches = [torch.randint(0, 257, (2, 11), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    tc = ParallelTranscoder(d, SAEConfig(num_latents=32, k=4), seed=2, skip=True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        tc.W_dec.copy_(0.05 * torch.randn(d, 32, generator=g))
        tc.W_skip.copy_(0.1 * torch.randn(d, d, generator=g))
        tc.b_dec.copy_(0.01 * torch.randn(d, generator=g))
    m = transcoder_splice_metrics(model, tc, 1, batches, groups)
    prefix = "transcoder/blocks.1.mlp/"
    assert set(m) == {prefix + n for n in METRIC_NAMES}
    hps = {hp.name: hp.module for hp in list_hookpoints(model)}
    state, ys, y_hats = {}, [], []

    def source(_m, _i, o):
        state["x"] = o

    def replace(_m, _i, o):
        if state["mode"] == "zero":
            return torch.zeros_like(o)
        y_hat = tc(state["x"]).x_hat
        ys.append(o.reshape(-1, d))
        y_hats.append(y_hat.reshape(-1, d))
        return y_hat

    handles = [hps["blocks.1.resid_mid"].register_forward_hook(source),
               hps["blocks.1.mlp.out"].register_forward_hook(replace)]
    model.eval()
    ce = {}
    with torch.no_grad():
        for mode in ("spliced", "zero"):
            state["mode"] = mode
            ce[mode] = sum(F.cross_entropy(model(b[:, :-1])[..., :257].flatten(0, 1), b[:, 1:].flatten(),
                                           reduction="sum").item() for b in batches) / 40
    for h in handles:
        h.remove()
    assert m[prefix + "ce_spliced"] == pytest.approx(ce["spliced"], rel=1e-5)
    assert m[prefix + "ce_zero"] == pytest.approx(ce["zero"], rel=1e-5)
    want = (m[prefix + "ce_zero"] - m[prefix + "ce_spliced"]) / (m[prefix + "ce_zero"] - m[prefix + "ce_clean"])
    assert m[prefix + "ce_loss_recovered"] == pytest.approx(want)
    ev = explained_variance(torch.cat(ys), torch.cat(y_hats)).item()
    assert m[prefix + "fvu"] == pytest.approx(1 - ev, rel=1e-4)
    assert 0 < m[prefix + "l0"] <= 4
    zero = ParallelTranscoder(d, SAEConfig(num_latents=32, k=4), seed=2)  # W_dec = 0, b_dec = 0, no skip
    mz = transcoder_splice_metrics(model, zero, 1, batches, groups)
    assert mz[prefix + "ce_spliced"] == mz[prefix + "ce_zero"] and mz[prefix + "ce_loss_recovered"] == 0.0


TC_ENTRY = {"type": "transcoder", "name": "tc", "coefficient": 0.5,
            "hookpoints": ["blocks.1.resid_mid", "blocks.1.mlp.out"], "mode": "joint", "skip": True,
            "normalize_decoder": True, "num_latents": 32, "k": 4, "b_pre_init": "mean", "lr": 1e-2, "seed": 3}


def test_joint_regularizer_gradient_equals_plain_backward(groups):
    """The regularizer's surrogate gives the model coefficient x dL/d(resid_mid, mlp.out) and
    the transcoder its own gradient, as a plain backward of coefficient x L through an
    identical transcoder; metrics report the target's EV."""
    from tti_dist.capture import ActivationCapture
    from tti_dist.capture.hookpoints import list_hookpoints
    from tti_dist.regularizers import build_regularizers, checked_regularizers
    from tti_dist.sae.transcoder import ParallelTranscoder

    tokens = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(7))
    model = _gpt(groups)
    (reg,) = build_regularizers(checked_regularizers([TC_ENTRY], model.cfg), model, groups)
    with ActivationCapture(reg.captures) as cap:
        model(tokens)
        weighted, metrics = reg(cap.captured, step=0)
    weighted.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert {"reg/tc/explained_variance", "reg/tc/l0", "reg/tc/aux_k", "reg/tc/dead_fraction"} <= set(metrics)
    ref_model = _gpt(groups)
    tc = ParallelTranscoder(model.cfg.hidden_size, reg.sae_cfg, seed=3, skip=True, normalize_decoder=True,
                            b_dec_rate=1.0)
    sites = [hp for hp in list_hookpoints(ref_model) if hp.name in ("blocks.1.resid_mid", "blocks.1.mlp.out")]
    with ActivationCapture(sites) as cap:
        ref_model(tokens)
        x, y = cap.captured["blocks.1.resid_mid"], cap.captured["blocks.1.mlp.out"]
        tc.init_biases(x.detach(), y.detach())
        out = tc(x, target=y.detach())
        loss, _ = tc.training_loss(y, out, None, normalize="fvu")
        (0.5 * loss).backward()
    assert weighted.item() == pytest.approx(0.5 * loss.item(), rel=1e-6)
    for name, p in ref_model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for name, p in tc.named_parameters():
        if name == "b_pre":  # b_dec: refitted in the forward, no gradient
            assert p.grad is None and reg.sae.b_dec.grad is None
            torch.testing.assert_close(reg.sae.b_dec, p)
            continue
        torch.testing.assert_close(dict(reg.sae.named_parameters())[name].grad, p.grad / 0.5, rtol=1e-4, atol=1e-7)
    assert all(p is not reg.sae.b_dec for group in reg.optimizer.param_groups for p in group["params"])
    assert got  # joint: the model received a gradient


@pytest.mark.parametrize("change, match", [
    ({"hookpoints": ["blocks.1.resid_mid"]}, r"regularizers\[0\]\.hookpoints: matches \['blocks\.1\.resid_mid'\]; "
                                             r"type 'transcoder' takes exactly"),
    ({"hookpoints": ["blocks.0.resid_mid", "blocks.1.mlp.out"]}, r"regularizers\[0\]\.hookpoints: .*one dense block"),
    ({"hookpoints": ["blocks.1.resid_post", "blocks.1.mlp.out"]}, r"regularizers\[0\]\.hookpoints"),
    ({"k": 33}, r"regularizers\[0\]\.k: 33 is larger than the whole SAE"),
    ({"skip": "yes"}, r"regularizers\[0\]\.skip"),
    ({"lr": -1}, r"regularizers\[0\]\.lr"),
    ({"b_dec_rate": 0}, r"regularizers\[0\]\.b_dec_rate: 0\.0 must be a number in \(0, 1\]"),
    ({"b_dec_rate": 1.5}, r"regularizers\[0\]\.b_dec_rate: 1\.5 must be a number in \(0, 1\]"),
])
def test_config_errors_are_one_line(change, match):
    from tti_dist.config.schema import ModelConfig
    from tti_dist.errors import ConfigError
    from tti_dist.regularizers import checked_regularizers

    cfg = ModelConfig(num_layers=2, hidden_size=24, num_heads=4, max_seq_len=16)
    with pytest.raises(ConfigError, match=match) as info:
        checked_regularizers([{**TC_ENTRY, **change}], cfg)
    assert "\n" not in str(info.value)


def test_units_do_not_change_training():
    """The fixed scales make training independent of the activations' units: the FVU curve on
    (100 x, 0.001 y) equals the one on (x, y), AuxK active (dead latents)."""
    from tti_dist.sae import SAEConfig
    from tti_dist.sae.optimizer_step import sae_optimizer_step
    from tti_dist.sae.transcoder import ParallelTranscoder

    g = torch.Generator().manual_seed(5)
    w = torch.randn(D, D, generator=g)
    xs = [torch.randn(64, D, generator=g) for _ in range(10)]
    curves = []
    for cx, cy in ((1.0, 1.0), (100.0, 1e-3)):
        tc = ParallelTranscoder(D, SAEConfig(num_latents=N, k=3, aux_k=4), seed=0, skip=True)
        opt = torch.optim.Adam(tc.parameters(), lr=1e-2)
        dead = torch.zeros(N, dtype=torch.bool)
        dead[::3] = True
        curve = []
        for step, x in enumerate(xs):
            y = torch.tanh(x @ w.t())
            if step == 0:
                tc.init_biases(cx * x, cy * y)
            out = tc(cx * x)
            loss, parts = tc.training_loss(cy * y, out, dead, normalize="fvu")
            loss.backward()
            sae_optimizer_step(tc, opt, None, 1)
            curve.append([parts["mse"].item(), parts["aux_k"].item()])
        curves.append(torch.tensor(curve))
    assert curves[0][-1, 0] < 0.7 * curves[0][0, 0] and curves[0][:, 1].min() > 0
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_transcoder_learns_a_small_mlp(activation):
    """y = W2 ReLU(W1 x) + B x (a 32-unit MLP with a linear part), 150 Adam steps: the
    skip transcoder's FVU falls from 1 to below 0.35, in under 2 s."""
    from tti_dist.sae import SAEConfig
    from tti_dist.sae.transcoder import ParallelTranscoder

    torch.manual_seed(0)
    d, hidden = 8, 32
    g = torch.Generator().manual_seed(11)
    w1, w2, b = torch.randn(hidden, d, generator=g), torch.randn(d, hidden, generator=g) / 4, torch.randn(d, d, generator=g) / 2
    extra = dict(k=6) if activation == "topk" else dict(l0_coefficient=1e-3, jumprelu_init_threshold=0.05,
                                                           jumprelu_bandwidth=0.05)
    tc = ParallelTranscoder(d, SAEConfig(num_latents=64, activation=activation, b_pre_init="mean", **extra),
                            seed=0, skip=True)
    opt = torch.optim.Adam(tc.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a loaded machine
    start = time.perf_counter()
    fvus = []
    try:
        _train(tc, opt, g, w1, w2, b, d, fvus)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    print(activation, "FVU", round(fvus[0], 3), "->", round(fvus[-1], 3), f"{elapsed:.2f}s")
    assert fvus[0] == pytest.approx(1.0, abs=1e-4)
    assert fvus[-1] < 0.35
    assert elapsed < 2.0


def _train(tc, opt, g, w1, w2, b, d, fvus):
    from tti_dist.sae.optimizer_step import sae_optimizer_step

    for step in range(150):
        x = torch.randn(256, d, generator=g)
        y = F.relu(x @ w1.t()) @ w2.t() + x @ b.t()
        if step == 0:
            tc.init_biases(x, y)
        out = tc(x)
        loss, parts = tc.training_loss(y, out, None, normalize="fvu")
        loss.backward()
        sae_optimizer_step(tc, opt, None, 1)
        fvus.append(parts["mse"].item())


def _moving_mean_fvus(b_dec_rate, steps=30):
    """A fixed small MLP y = W2 ReLU(W1 x) + B x (spread ~0.04, as a young model's MLP output)
    plus a mean that moves by 0.05 along one direction every step (the model's own fc2 bias
    trained at the model's learning rate); a skip transcoder with Adam at lr 1e-3. Returns the
    live FVU of every step (the training forward's, after the refit when b_dec_rate is set)."""
    from tti_dist.sae import SAEConfig
    from tti_dist.sae.optimizer_step import sae_optimizer_step
    from tti_dist.sae.transcoder import ParallelTranscoder

    d, hidden = 8, 32
    g = torch.Generator().manual_seed(12)
    w1, w2, b = torch.randn(hidden, d, generator=g), torch.randn(d, hidden, generator=g) / 4, torch.randn(d, d, generator=g) / 2
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    tc = ParallelTranscoder(d, SAEConfig(num_latents=64, k=6, b_pre_init="mean", normalize_input=True), seed=0,
                            skip=True, b_dec_rate=b_dec_rate)
    opt = torch.optim.Adam([p for p in tc.parameters() if p.requires_grad], lr=1e-3)
    fvus = []
    for step in range(steps):
        x = torch.randn(256, d, generator=g)
        y = 0.01 * (F.relu(x @ w1.t()) @ w2.t() + x @ b.t()) + 0.05 * step * u
        if step == 0:
            tc.init_biases(x, y)
        out = tc(x, target=y)
        loss, parts = tc.training_loss(y, out, None, normalize="fvu")
        loss.backward()
        sae_optimizer_step(tc, opt, None, 1)
        fvus.append(parts["mse"].item())
    return tc, fvus


def test_b_dec_refit_keeps_up_with_a_moving_target_mean():
    """The co-training failure (a young model's MLP output mean moving far faster than Adam
    moves b_dec): with b_dec trained by Adam the live FVU explodes; refitted per batch (b_dec =
    the batch's mean residual) it stays below 1 and b_dec tracks the mean; b_dec gets no
    gradient and an eval-mode forward leaves it alone."""
    _, adam = _moving_mean_fvus(None)
    tc, refit = _moving_mean_fvus(1.0)
    print("FVU adam", [round(v, 2) for v in adam[::5]], "refit", [round(v, 3) for v in refit[::5]])
    assert adam[-1] > 100  # the failure: y_hat stays near the first batch's mean
    assert max(refit) <= 1.0 + 1e-6 and refit[-1] < 0.75  # learns as on a fixed target (0.71 when recorded)
    assert tc.b_dec.grad is None and not tc.b_dec.requires_grad
    before = tc.b_dec.detach().clone()
    tc.eval()
    x = torch.randn(16, 8)
    tc(x, target=torch.full((16, 8), 100.0))
    assert torch.equal(tc.b_dec, before)


def test_b_dec_refit_is_the_batch_mean_residual():
    """rate 1: b_dec = mean_t(target_scale y - W_dec f - W_skip x_s), so the mean error of the
    returned y_hat is 0; rate 0.25 moves a quarter of the way; bad rates are refused."""
    tc = _tc(skip=True, b_dec_rate=1.0)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        tc.W_dec.copy_(torch.randn(D, N, generator=g))
        tc.W_skip.copy_(torch.randn(D, D, generator=g))
        tc.target_scale.fill_(3.0)
    x, y = torch.randn(40, D, generator=g), torch.randn(40, D, generator=g) + 5.0
    out = tc(x, target=y)
    want = (3.0 * y - out.latents @ tc.W_dec.t() - out.x_in @ tc.W_skip.t()).mean(0)
    torch.testing.assert_close(tc.b_dec.detach(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((y - out.x_hat).mean(0), torch.zeros(D), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.x_hat, tc(x).x_hat)  # the returned y_hat used the refitted b_dec
    quarter = _tc(skip=True, b_dec_rate=0.25)
    with torch.no_grad():
        quarter.load_state_dict(tc.state_dict())
        quarter.b_dec.fill_(1.0)
    quarter(x, target=y)
    torch.testing.assert_close(quarter.b_dec.detach(), 0.75 + 0.25 * want, rtol=1e-5, atol=1e-5)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="b_dec_rate"):
            _tc(b_dec_rate=bad)
