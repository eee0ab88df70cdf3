"""AbsTopK activation sparsity (model.abs_topk_fraction / abs_topk_sites) on one rank.

The model's sparsified sites equal a block recomputed by hand from its own weights with a
stable-sort AbsTopK reference; every site keeps exactly k entries per token; gradients pass
through the kept entries only; the option off is the dense model bit for bit; bad settings
are refused in one line; GPT-2/GPT-NeoX export is refused. TP=2 == TP=1 is in
tests/distributed/test_topk.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tti_dist.config.schema import ABS_TOPK_SITES, ModelConfig, RunConfig
from tti_dist.errors import ConfigError

HIDDEN = 32
FRACTION = 0.25
K = int(FRACTION * HIDDEN)


def _reference_abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but the first k entries of each row in (|x| desc, index asc) order zeroed."""
    idx = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :k]
    return x * torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def _model(groups, **kwargs):
    from tti_dist.models.gpt import GPT
    from tti_dist.utils.seeding import seed_weights

    cfg = ModelConfig(num_layers=2, hidden_size=HIDDEN, num_heads=4, max_seq_len=16, **kwargs)
    seed_weights(3)
    return GPT(cfg, groups), cfg


def _capture(model, names, tokens):
    from tti_dist.capture import ActivationCapture, resolve_hookpoints

    with ActivationCapture(resolve_hookpoints(model, names, "test")) as cap:
        logits = model(tokens)
        return logits, dict(cap.captured)


TOKENS = torch.randint(0, 257, (3, 12), generator=torch.Generator().manual_seed(5))


def test_every_site_matches_a_block_recomputed_by_hand(groups):
    model, cfg = _model(groups, abs_topk_fraction=FRACTION, abs_topk_sites=ABS_TOPK_SITES)
    _, acts = _capture(model, ["blocks.0.resid_pre", "blocks.0.attn.out", "blocks.0.resid_mid", "blocks.0.mlp.out",
                               "blocks.0.resid_post"], TOKENS)
    block = model.blocks[0]
    x = acts["blocks.0.resid_pre"]
    B, T, D = x.shape
    heads, hd = cfg.num_heads, D // cfg.num_heads
    with torch.no_grad():
        h = _reference_abs_topk(F.layer_norm(x, (D,), block.ln1.weight, block.ln1.bias, cfg.layernorm_eps), K)
        qkv = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).view(B, T, heads, 3, hd)
        q, k, v = (_reference_abs_topk(qkv[:, :, :, i].reshape(B, T, D), K).view(B, T, heads, hd).transpose(1, 2)
                   for i in range(3))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        attn_out = _reference_abs_topk(z @ block.attn.proj.weight.T + block.attn.proj.bias, K)
        resid_mid = _reference_abs_topk(x + attn_out, K)
        m = _reference_abs_topk(F.layer_norm(resid_mid, (D,), block.ln2.weight, block.ln2.bias, cfg.layernorm_eps), K)
        mlp_out = _reference_abs_topk(F.gelu(m @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T
                                      + block.mlp.fc2.bias, K)
        resid_post = _reference_abs_topk(resid_mid + mlp_out, K)
    for name, expected in [("attn.out", attn_out), ("resid_mid", resid_mid), ("mlp.out", mlp_out),
                           ("resid_post", resid_post)]:
        got = acts[f"blocks.0.{name}"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda s: f"{name}: {s}")
        assert torch.equal((got != 0).sum(-1), torch.full((B, T), K)), name  # exactly k kept per token


def test_default_sites_leave_the_stream_itself_dense(groups):
    """The reference's default sites sparsify reads and writes; the stream's sum is not cut."""
    model, _ = _model(groups, abs_topk_fraction=FRACTION)
    _, acts = _capture(model, ["blocks.*.attn.out", "blocks.*.mlp.out", "blocks.*.resid_post"], TOKENS)
    for layer in range(2):
        for name in ("attn.out", "mlp.out"):
            l0 = (acts[f"blocks.{layer}.{name}"] != 0).sum(-1)
            assert torch.equal(l0, torch.full_like(l0, K)), (layer, name)
        assert float((acts[f"blocks.{layer}.resid_post"] != 0).float().sum(-1).mean()) > K + 1


def test_off_is_the_dense_model_bit_for_bit(groups):
    dense, _ = _model(groups)
    off, _ = _model(groups, abs_topk_fraction=1.0, abs_topk_sites=("attn_q", "resid_post"))
    on, _ = _model(groups, abs_topk_fraction=FRACTION)
    with torch.no_grad():
        assert torch.equal(dense(TOKENS), off(TOKENS))
        assert not torch.allclose(dense(TOKENS), on(TOKENS), atol=1e-3)
    assert list(dense.state_dict()) == list(on.state_dict())  # no parameters or buffers added
    assert all(torch.equal(a, b) for a, b in zip(dense.parameters(), on.parameters()))  # same init


def test_gradient_passes_through_kept_entries_only_and_ties_go_to_the_lower_index():
    from tti_dist.models.activation_sparsity import AbsTopK

    site = AbsTopK(ModelConfig(hidden_size=8, num_heads=2, abs_topk_fraction=0.25, abs_topk_sites=("mlp_out",)),
                   "mlp_out")
    x = torch.tensor([[3.0, -5.0, 1.0, 5.0, 0.0, -2.0, 2.0, 4.0],
                      [1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0]], requires_grad=True)
    y = site(x)
    assert torch.equal(y.detach(), torch.tensor([[0.0, -5.0, 0, 5.0, 0, 0, 0, 0], [1.0, -1.0, 0, 0, 0, 0, 0, 0]]))
    grad_out = torch.arange(16.0).view(2, 8) + 1
    y.backward(grad_out)
    assert torch.equal(x.grad, grad_out * (y.detach() != 0))
    assert AbsTopK(ModelConfig(hidden_size=8, num_heads=2, abs_topk_fraction=0.25, abs_topk_sites=("mlp_out",)),
                   "attn_in")(x) is x  # a site not listed is the identity


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 0.99])
def test_k_is_the_floor_of_fraction_times_width(fraction):
    cfg = ModelConfig(hidden_size=40, num_heads=4, abs_topk_fraction=fraction)
    assert cfg.abs_topk_k == math.floor(fraction * 40)
    assert cfg.sparsity_options() == {"abs_topk_fraction": fraction}
    assert ModelConfig(abs_topk_fraction=1.0).abs_topk_k == 0 and ModelConfig().sparsity_options() == {}


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(abs_topk_fraction=0.0), "model.abs_topk_fraction: 0.0 must be in (0, 1]"),
    (dict(abs_topk_fraction=1.5), "model.abs_topk_fraction: 1.5 must be in (0, 1]"),
    (dict(abs_topk_fraction=0.01), "keep at least one of the 32 entries"),
    (dict(abs_topk_fraction=float("nan")), "model.abs_topk_fraction"),
    (dict(abs_topk_fraction=0.25, abs_topk_sites=("attn_in", "resid")),
     "model.abs_topk_sites: 'resid' is not a site; allowed: attn_in, attn_q"),
    (dict(abs_topk_fraction=0.25, abs_topk_sites=("mlp_neuron",)), "model.mlp_topk with mlp_topk_by: abs"),
    (dict(abs_topk_fraction=0.25, abs_topk_sites=("mlp_in", "mlp_in")), "must name each site once"),
    (dict(abs_topk_fraction=0.25, abs_topk_sites=()), "must name each site once"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, fragment):
    from tti_dist.config.validate import validate_config

    cfg = RunConfig(model=ModelConfig(hidden_size=HIDDEN, num_heads=4, **kwargs))
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_sites_without_a_fraction_are_reported_as_ignored():
    from tti_dist.config.validate import ignored_settings

    notes = ignored_settings(RunConfig(model=ModelConfig(abs_topk_sites=("attn_q",))))
    assert notes == ["model.abs_topk_sites: ['attn_q'] is ignored with abs_topk_fraction 1.0"]


def test_hf_export_is_refused():
    from tti_dist.train.hf_export import check_exportable

    with pytest.raises(ConfigError, match=r"model.abs_topk_fraction: 0.25 cannot be exported with --format hf"):
        check_exportable(ModelConfig(abs_topk_fraction=0.25))
    check_exportable(ModelConfig(abs_topk_fraction=1.0))
