"""Tests of named hookpoints and activation capture on a real (tp_size=1) megatron GPT, plus
the model's parameter bookkeeping (count_parameters, tp_partition_dims) and lm_loss.

A size-1 gloo process group and megatron's parallel_state are set up once for the module.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from tti_dist.capture import ActivationCapture, HookPoint, list_hookpoints, resolve_hookpoints, summarize_names
from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError

TINY = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16)

BLOCK_SITES_MODULE_ORDER = [  # modules are registered in data-flow order
    "resid_pre", "attn.z", "attn.out", "resid_mid", "mlp.pre", "mlp.act", "mlp.out", "resid_post",
]
BLOCK_SITES = {"resid_pre", "attn.z", "attn.out", "resid_mid", "mlp.pre", "mlp.act", "mlp.out", "resid_post"}
SHARDED_SITES = {"attn.z", "mlp.pre", "mlp.act"}


def build(cfg: ModelConfig, groups, seed: int = 0):
    from tti_dist.models.gpt import GPT

    torch.manual_seed(seed)
    return GPT(cfg, groups)


@pytest.fixture(scope="module")
def model(groups):
    m = build(TINY, groups)
    m.eval()
    return m


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY.vocab_size, (2, TINY.max_seq_len), generator=gen)


# --------------------------------------------------------------------------- listing


def test_hookpoint_names_in_data_flow_order(model):
    names = [hp.name for hp in list_hookpoints(model)]
    expected = ["tokens", "embed"]
    for i in range(2):
        expected += [f"blocks.{i}.{site}" for site in BLOCK_SITES_MODULE_ORDER]
    expected.append("final_norm")
    assert names == expected
    # Same order as named_modules (module order), with the hook_ prefix dropped.
    module_paths = [p for p, m in model.named_modules() if isinstance(m, HookPoint)]
    assert [p.replace("hook_", "") for p in module_paths] == names
    # And exactly the documented set.
    assert set(names) == {"tokens", "embed", "final_norm"} | {f"blocks.{i}.{s}" for i in range(2) for s in BLOCK_SITES}
    assert len(names) == 19


def test_tp_sharded_flags_and_global_dims(model):
    for hp in list_hookpoints(model):
        site = hp.name.split(".", 2)[-1] if hp.name.startswith("blocks.") else hp.name
        assert hp.tp_sharded is (site in SHARDED_SITES), hp.name
        expected_dim = 4 * 32 if site in ("mlp.pre", "mlp.act") else 1 if site == "tokens" else 32
        assert hp.global_dim == expected_dim, hp.name
        assert isinstance(hp.module, HookPoint)
        assert hp.module.global_dim == hp.global_dim and hp.module.tp_sharded == hp.tp_sharded


def test_ffn_hidden_size_sets_mlp_global_dim(groups):
    m = build(ModelConfig(num_layers=1, hidden_size=32, num_heads=4, max_seq_len=16, ffn_hidden_size=48), groups)
    dims = {hp.name: hp.global_dim for hp in list_hookpoints(m)}
    assert dims["blocks.0.mlp.pre"] == 48 and dims["blocks.0.mlp.act"] == 48 and dims["blocks.0.mlp.out"] == 32


def test_hookpoint_is_identity():
    hp = HookPoint(3, tp_sharded=False)
    x = torch.randn(2, 3)
    assert hp(x) is x


# --------------------------------------------------------------------------- resolving


def test_resolve_glob(model):
    hits = resolve_hookpoints(model, ["blocks.*.mlp.act"], "regularizers[0].hookpoints")
    assert [hp.name for hp in hits] == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert hits[0].module is model.blocks[0].mlp.hook_act
    assert hits[1].module is model.blocks[1].mlp.hook_act


def test_resolve_star_crosses_dots_and_deduplicates(model):
    assert len(resolve_hookpoints(model, ["*"], "f")) == 19
    hits = resolve_hookpoints(model, ["*mlp.a*", "blocks.1.*", "embed"], "f")
    names = [hp.name for hp in hits]
    assert names[:2] == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    # blocks.1.mlp.act was already chosen by the first pattern; the other 7 follow in module order.
    assert names[2:9] == [f"blocks.1.{s}" for s in BLOCK_SITES_MODULE_ORDER if s != "mlp.act"]
    assert names[-1] == "embed"
    assert len(names) == len(set(names)) == 2 + 7 + 1
    assert [hp.name for hp in resolve_hookpoints(model, ["blocks.?.resid_*"], "f")] == [
        f"blocks.{i}.resid_{w}" for i in range(2) for w in ("pre", "mid", "post")
    ]


def test_resolve_nothing_is_config_error_with_compact_listing(model):
    with pytest.raises(ConfigError) as info:
        resolve_hookpoints(model, ["blocks.*.mlp.act", "blocks.*.mlpp"], "regularizers[1].hookpoints")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (
        "regularizers[1].hookpoints[1]: 'blocks.*.mlpp' matches no hookpoint; available: tokens, embed, "
        "blocks.{0..1}.resid_pre, blocks.{0..1}.attn.z, blocks.{0..1}.attn.out, blocks.{0..1}.resid_mid, "
        "blocks.{0..1}.mlp.pre, blocks.{0..1}.mlp.act, blocks.{0..1}.mlp.out, blocks.{0..1}.resid_post, "
        "final_norm"
    )


def test_resolve_is_case_sensitive(model):
    with pytest.raises(ConfigError, match=r"^f\[0\]: 'EMBED' matches no hookpoint"):
        resolve_hookpoints(model, ["EMBED"], "f")


@pytest.mark.parametrize(
    "names, expected",
    [
        ([], ""),
        (["embed"], "embed"),
        (["embed", "final_norm"], "embed, final_norm"),
        (["blocks.0.mlp.act", "blocks.1.mlp.act", "blocks.2.mlp.act", "blocks.3.mlp.act"], "blocks.{0..3}.mlp.act"),
        (["blocks.2.x", "blocks.0.x", "blocks.1.x"], "blocks.{0..2}.x"),
        (["blocks.0.x", "blocks.2.x"], "blocks.{0,2}.x"),
        ([f"blocks.{i}.x" for i in range(12)], "blocks.{0..11}.x"),
        (["blocks.3.x", "blocks.10.x", "blocks.9.x"], "blocks.{3,9,10}.x"),
        (
            ["embed", "blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b", "final_norm"],
            "embed, blocks.{0..1}.a, blocks.{0..1}.b, final_norm",
        ),
        # Only the first index is grouped.
        (["layers.0.sub.1.x", "layers.1.sub.1.x"], "layers.{0..1}.sub.1.x"),
    ],
)
def test_summarize_names(names, expected):
    assert summarize_names(names) == expected


def test_summarize_single_index_keeps_real_name():
    assert summarize_names(["embed", "blocks.0.mlp.act", "final_norm"]) == "embed, blocks.0.mlp.act, final_norm"


# --------------------------------------------------------------------------- capture


def test_capture_values_follow_the_dataflow(model, tokens):
    with torch.no_grad(), ActivationCapture(list_hookpoints(model)) as cap:
        logits = model(tokens)
        got = dict(cap.captured)
    assert set(got) == {hp.name for hp in list_hookpoints(model)}
    B, T = tokens.shape
    assert torch.equal(got.pop("tokens"), tokens)
    for name, t in got.items():
        dim = 128 if name.endswith(("mlp.pre", "mlp.act")) else 32
        assert t.shape == (B, T, dim), name
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        assert torch.equal(got[p + "mlp.act"], F.gelu(got[p + "mlp.pre"]))
        assert torch.equal(got[p + "resid_mid"], got[p + "resid_pre"] + got[p + "attn.out"])
        assert torch.equal(got[p + "resid_post"], got[p + "resid_mid"] + got[p + "mlp.out"])
        assert torch.equal(got[p + "attn.out"], block.attn.proj(got[p + "attn.z"])[0])
        assert torch.equal(got[p + "mlp.pre"], block.mlp.fc1(block.ln2(got[p + "resid_mid"]))[0])
    assert torch.equal(got["blocks.0.resid_pre"], got["embed"])
    assert torch.equal(got["blocks.1.resid_pre"], got["blocks.0.resid_post"])
    assert torch.equal(got["final_norm"], model.final_norm(got["blocks.1.resid_post"]))
    # Tied embeddings: logits are final_norm @ embedding^T over the padded vocabulary.
    assert logits.shape == (B, T, TINY.padded_vocab_size)
    torch.testing.assert_close(logits, got["final_norm"] @ model.embedding.weight.T, rtol=1e-5, atol=1e-6)
    # The embed hook sees token + position embeddings.
    expected_embed = model.embedding.weight[tokens] + model.position_embedding.weight[:T]
    torch.testing.assert_close(got["embed"], expected_embed, rtol=0, atol=1e-7)


def test_captured_tensors_carry_grad_into_the_model(groups, tokens):
    m = build(TINY, groups, seed=3)
    hits = resolve_hookpoints(m, ["blocks.0.mlp.act"], "f")
    with ActivationCapture(hits) as cap:
        m(tokens)
        act = cap.captured["blocks.0.mlp.act"]
        assert act.requires_grad and act.grad_fn is not None
        act.pow(2).mean().backward()
    fc1 = m.blocks[0].mlp.fc1
    assert fc1.weight.grad is not None and fc1.weight.grad.abs().sum() > 0
    assert fc1.bias.grad is not None and fc1.bias.grad.abs().sum() > 0
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # upstream of the hook
    assert m.embedding.weight.grad.abs().sum() > 0
    # Downstream of blocks.0.mlp.act nothing receives a gradient.
    assert m.blocks[0].mlp.fc2.weight.grad is None
    assert all(p.grad is None for p in m.blocks[1].parameters())
    assert m.final_norm.weight.grad is None

    # The fc1 gradient equals the one from recomputing the same activation by hand.
    fc1.weight.grad = None
    blk = m.blocks[0]
    x = m.embedding(tokens) + m.position_embedding(torch.arange(tokens.shape[1]))
    x = x + blk.attn(blk.ln1(x))
    ref = F.gelu(F.linear(blk.ln2(x), fc1.weight, fc1.bias))
    (g,) = torch.autograd.grad(ref.pow(2).mean(), fc1.weight)
    with ActivationCapture(hits) as cap:
        m(tokens)
        cap.captured["blocks.0.mlp.act"].pow(2).mean().backward()
    torch.testing.assert_close(fc1.weight.grad, g, rtol=1e-5, atol=1e-8)


def test_capture_only_selected_and_latest_forward(model, tokens):
    hits = resolve_hookpoints(model, ["final_norm", "blocks.1.attn.z"], "f")
    with torch.no_grad(), ActivationCapture(hits) as cap:
        model(tokens)
        assert set(cap.captured) == {"final_norm", "blocks.1.attn.z"}
        first = cap.captured["final_norm"]
        model(tokens[:1, :5])
        assert cap.captured["final_norm"].shape == (1, 5, 32)
        assert cap.captured["final_norm"] is not first
        cap.clear()
        assert cap.captured == {}


def test_hooks_removed_after_exit(model, tokens):
    hits = list_hookpoints(model)
    before = {hp.name: len(hp.module._forward_hooks) for hp in hits}
    with torch.no_grad():
        with ActivationCapture(hits) as cap:
            assert all(len(hp.module._forward_hooks) == before[hp.name] + 1 for hp in hits)
            model(tokens)
            assert len(cap.captured) == 19
        assert cap.captured == {}
        model(tokens)
        assert cap.captured == {}
    assert {hp.name: len(hp.module._forward_hooks) for hp in hits} == before


def test_hooks_removed_after_exception(model, tokens):
    hits = list_hookpoints(model)
    before = {hp.name: len(hp.module._forward_hooks) for hp in hits}
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCapture(hits) as cap:
            with torch.no_grad():
                model(tokens)
            raise RuntimeError("boom")
    assert cap.captured == {}
    with torch.no_grad():
        model(tokens)
    assert cap.captured == {}
    assert {hp.name: len(hp.module._forward_hooks) for hp in hits} == before


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_count_parameters_matches_model(groups, position_embedding, tie_embeddings, bias):
    from tti_dist.models.gpt import count_parameters

    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16, ffn_hidden_size=48,
        position_embedding=position_embedding, tie_embeddings=tie_embeddings, bias=bias,
    )
    m = build(cfg, groups)
    assert count_parameters(cfg) == sum(p.numel() for p in m.parameters())
    # Independent closed form: d=32, f=48, padded vocab 384, 2 layers, max_seq_len 16.
    d, f, v, b = 32, 48, 384, int(bias)
    per_block = 2 * d * (1 + b) + (3 * d * d + 3 * d * b) + (d * d + d * b) + (d * f + f * b) + (f * d + d * b)
    expected = v * d + 2 * per_block + d * (1 + b)
    expected += 16 * d if position_embedding == "learned" else 0
    expected += 0 if tie_embeddings else v * d
    assert count_parameters(cfg) == expected


def test_tp_partition_dims(groups):
    from tti_dist.models.gpt import tp_partition_dims

    m = build(ModelConfig(num_layers=1, hidden_size=32, num_heads=4, max_seq_len=16, tie_embeddings=False), groups)
    dims = tp_partition_dims(m)
    assert set(dims) == {n for n, _ in m.named_parameters()}
    assert dims == {
        "embedding.weight": 0,
        "position_embedding.weight": None,
        "blocks.0.ln1.weight": None,
        "blocks.0.ln1.bias": None,
        "blocks.0.attn.qkv.weight": 0,
        "blocks.0.attn.qkv.bias": 0,
        "blocks.0.attn.proj.weight": 1,
        "blocks.0.attn.proj.bias": None,
        "blocks.0.ln2.weight": None,
        "blocks.0.ln2.bias": None,
        "blocks.0.mlp.fc1.weight": 0,
        "blocks.0.mlp.fc1.bias": 0,
        "blocks.0.mlp.fc2.weight": 1,
        "blocks.0.mlp.fc2.bias": None,
        "final_norm.weight": None,
        "final_norm.bias": None,
        "output_layer.weight": 0,
    }


def test_tied_model_has_no_output_weight(model):
    names = {n for n, _ in model.named_parameters()}
    assert "output_layer.weight" not in names
    assert "embedding.weight" in names


def test_lm_loss_is_cross_entropy_at_tp1(model, tokens):
    from tti_dist.models.gpt import lm_loss

    with torch.no_grad():
        logits = model(tokens)
    targets = torch.roll(tokens, -1, dims=1)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    loss = lm_loss(logits.clone(), targets)
    assert loss.shape == tokens.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.view_as(loss), rtol=1e-5, atol=1e-6)
    # bf16 logits are upcast: same loss as on the fp32 copy of the rounded logits.
    low = logits.to(torch.bfloat16)
    ref_low = F.cross_entropy(low.float().reshape(-1, low.shape[-1]), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(lm_loss(low, targets), ref_low.view_as(loss), rtol=1e-5, atol=1e-6)


def test_lm_loss_leaves_fp32_logits_unchanged(model, tokens):
    from tti_dist.models.gpt import lm_loss

    with torch.no_grad():
        logits = model(tokens)
    before = logits.clone()
    lm_loss(logits, torch.roll(tokens, -1, dims=1))
    assert torch.equal(logits, before)


# --------------------------------------------------------------------------- bottleneck

BN = ModelConfig(num_layers=3, hidden_size=32, num_heads=4, max_seq_len=16, bottleneck_layer=1, bottleneck_dim=8)
BOTTLENECK_SITES_ORDER = ["bottleneck.mu", "bottleneck.logvar", "bottleneck.z", "bottleneck.out"]


@pytest.fixture(scope="module")
def bn_model(groups):
    return build(BN, groups, seed=4)


def test_bottleneck_hookpoints_follow_resid_post_and_match_static_names(bn_model):
    from tti_dist.models.layout import gpt_hookpoint_names, hookpoint_width, is_tp_sharded

    hps = list_hookpoints(bn_model)
    names = [hp.name for hp in hps]
    expected = ["tokens", "embed"]
    for i in range(3):
        expected += [f"blocks.{i}.{s}" for s in BLOCK_SITES_MODULE_ORDER]
        expected += [f"blocks.{i}.{s}" for s in BOTTLENECK_SITES_ORDER] if i == 1 else []
    expected.append("final_norm")
    assert names == expected == gpt_hookpoint_names(BN)
    for hp in hps:
        site = hp.name.split(".", 2)[-1] if hp.name.startswith("blocks.") else hp.name
        assert hp.tp_sharded is (site in SHARDED_SITES | {"bottleneck.mu", "bottleneck.logvar", "bottleneck.z"})
        assert hp.tp_sharded is is_tp_sharded(hp.name), hp.name
        assert hp.global_dim == hookpoint_width(hp.name, BN), hp.name
    dims = {hp.name: hp.global_dim for hp in hps}
    assert dims["blocks.1.bottleneck.z"] == 8 and dims["blocks.1.bottleneck.out"] == 32


def test_bottleneck_replaces_the_stream_with_dec_of_mu_in_eval(bn_model, tokens):
    bn_model.eval()
    with torch.no_grad(), ActivationCapture(list_hookpoints(bn_model)) as cap:
        bn_model(tokens)
        got = dict(cap.captured)
    bn = bn_model.blocks[1].bottleneck
    p = "blocks.1.bottleneck."
    h = bn.ln(got["blocks.1.resid_post"])
    torch.testing.assert_close(got[p + "mu"], F.linear(h, bn.enc_mu.weight, bn.enc_mu.bias))
    torch.testing.assert_close(got[p + "logvar"], F.linear(h, bn.enc_logvar.weight, bn.enc_logvar.bias))
    assert torch.equal(got[p + "z"], got[p + "mu"])  # eval: no noise
    torch.testing.assert_close(got[p + "out"], F.linear(got[p + "z"], bn.dec.weight, bn.dec.bias))
    # A true bottleneck: the next block sees dec(z) only, not resid_post + dec(z).
    assert torch.equal(got["blocks.2.resid_pre"], got[p + "out"])
    # Initialisation: logvar starts at -4 everywhere (zero weight), mu ~ N(0, 1), out at embedding scale.
    torch.testing.assert_close(got[p + "logvar"], torch.full_like(got[p + "logvar"], -4.0))
    assert 0.5 < got[p + "mu"].std().item() < 1.5
    assert 0.3 * TINY.init_std < got[p + "out"].std().item() < 3 * TINY.init_std


def test_bottleneck_samples_in_training_mode(bn_model, tokens):
    bn_model.train()
    try:
        hits = resolve_hookpoints(bn_model, ["blocks.1.bottleneck.*"], "f")
        with torch.no_grad(), ActivationCapture(hits) as cap:
            torch.manual_seed(0)
            bn_model(tokens)
            first = dict(cap.captured)
            torch.manual_seed(0)
            bn_model(tokens)
            again = dict(cap.captured)
            bn_model(tokens)
            other = dict(cap.captured)
    finally:
        bn_model.eval()
    p = "blocks.1.bottleneck."
    eps = (first[p + "z"] - first[p + "mu"]) / torch.exp(0.5 * first[p + "logvar"])
    torch.manual_seed(0)
    torch.testing.assert_close(eps, torch.randn(eps.shape), rtol=1e-4, atol=1e-4)  # eps from the global RNG
    assert torch.equal(first[p + "z"], again[p + "z"])
    assert not torch.equal(first[p + "z"], other[p + "z"])


@pytest.mark.parametrize("bias", [True, False])
def test_count_parameters_with_bottleneck(groups, bias):
    from tti_dist.models.gpt import count_parameters

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16, bias=bias,
                      bottleneck_layer=0, bottleneck_dim=8)
    m = build(cfg, groups)
    assert count_parameters(cfg) == sum(p.numel() for p in m.parameters())
    plain = count_parameters(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16, bias=bias))
    b = int(bias)
    # LayerNorm, mu encoder, logvar encoder (always with its bias), decoder.
    assert count_parameters(cfg) - plain == 32 * (1 + b) + (32 * 8 + 8 * b) + (32 * 8 + 8) + (8 * 32 + 32 * b)


def test_tp_partition_dims_of_bottleneck(bn_model):
    from tti_dist.models.gpt import tp_partition_dims

    dims = {k: v for k, v in tp_partition_dims(bn_model).items() if ".bottleneck." in k}
    assert dims == {
        "blocks.1.bottleneck.ln.weight": None,
        "blocks.1.bottleneck.ln.bias": None,
        "blocks.1.bottleneck.enc_mu.weight": 0,
        "blocks.1.bottleneck.enc_mu.bias": 0,
        "blocks.1.bottleneck.enc_logvar.weight": 0,
        "blocks.1.bottleneck.enc_logvar.bias": 0,
        "blocks.1.bottleneck.dec.weight": 1,
        "blocks.1.bottleneck.dec.bias": None,
    }
