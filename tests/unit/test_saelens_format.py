"""SAELens's on-disk format (tti_dist.sae.saelens_format) without a run: the hook-name table
and its refusals, cfg.json field for field as SAELens's own save_model writes it, the TP
shard merge, SAELens computing tti's SAE (TopK, ReLU, JumpReLU, and BatchTopK / Matryoshka in
their JumpReLU inference form; the hook_z reshape), the refusal of normalize_input, and the
atomic write."""

from __future__ import annotations

import json

import pytest
import torch

from tti_dist.config.sae import SAEConfig
from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.sae.model import ParallelSAE
from tti_dist.sae.saelens_format import (
    check_exportable,
    merge_tp_shards,
    saelens_config,
    saelens_tensors,
    transformer_lens_hook,
    write_export,
)

MODEL = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16)
META = {"model_name": "run", "context_size": 16, "prepend_bos": False}


@pytest.mark.parametrize("site, hook, reshape", [
    ("embed", "blocks.0.hook_resid_pre", "none"),
    ("blocks.0.resid_pre", "blocks.0.hook_resid_pre", "none"),
    ("blocks.1.attn.z", "blocks.1.attn.hook_z", "hook_z"),
    ("blocks.1.attn.out", "blocks.1.hook_attn_out", "none"),
    ("blocks.1.resid_mid", "blocks.1.hook_resid_mid", "none"),
    ("blocks.0.mlp.pre", "blocks.0.mlp.hook_pre", "none"),
    ("blocks.0.mlp.act", "blocks.0.mlp.hook_post", "none"),
    ("blocks.0.mlp.out", "blocks.0.hook_mlp_out", "none"),
    ("blocks.1.resid_post", "blocks.1.hook_resid_post", "none"),
    ("final_norm", "ln_final.hook_out", "none"),
])
def test_hook_names(site, hook, reshape):
    assert transformer_lens_hook(site, MODEL) == (hook, reshape)


@pytest.mark.parametrize("site, model, reason", [
    ("tokens", MODEL, "tokens has no TransformerLens hook (it holds token ids, not activations)"),
    ("blocks.1.moe.out", MODEL, "blocks.1.moe.out has no TransformerLens hook (TransformerLens's HookedTransformer "
                                "has no mixture-of-experts layer)"),
    ("blocks.0.bottleneck.out", MODEL, "blocks.0.bottleneck.out has no TransformerLens hook (TransformerLens has "
                                       "no stochastic bottleneck)"),
    ("blocks.0.mlp.act", ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16, mlp_topk=8),
     "blocks.0.mlp.act is the MLP activation after model.mlp_topk 8 keeps the top units"),
])
def test_sites_without_a_hook_are_refused(site, model, reason):
    with pytest.raises(ConfigError) as exc:
        transformer_lens_hook(site, model)
    assert str(exc.value).startswith(f"site: {reason}") and "\n" not in str(exc.value)


def test_normalize_input_refused():
    check_exportable(SAEConfig(num_latents=8, activation="relu"), "x")
    with pytest.raises(ConfigError, match=r"^regularizers\[0\]\.normalize_input: true is not exportable: "):
        check_exportable(SAEConfig(num_latents=8, normalize_input=True), "regularizers[0]")


def _sae(cfg: SAEConfig, seed: int = 0) -> ParallelSAE:
    sae = ParallelSAE(32, cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases, so the b_pre / b_dec roles are exercised
        sae.b_pre.copy_(torch.randn(32, generator=g) * 0.5)
        sae.b_enc.copy_(torch.randn(cfg.num_latents, generator=g) * 0.1)
        if cfg.activation == "jumprelu":  # thresholds of different sizes, in the pre-activations' range
            sae.log_threshold.copy_(torch.log(0.05 + 0.5 * torch.rand(cfg.num_latents, generator=g)))
        if cfg.activation in ("batchtopk", "matryoshka"):  # the running threshold from two training batches
            for _ in range(2):
                sae(torch.randn(16, 32, generator=g), inference=False)
            assert sae.batchtopk_threshold > 0
    sae.eval()
    return sae


def _shards(sae: ParallelSAE, tp: int) -> list[dict[str, torch.Tensor]]:
    """The state dicts TP ranks 0..tp-1 would hold (contiguous latent blocks)."""
    s = sae.state_dict()
    shards = [{"W_enc": s["W_enc"].chunk(tp, 0)[r], "b_enc": s["b_enc"].chunk(tp)[r],
               "W_dec": s["W_dec"].chunk(tp, 1)[r], "b_pre": s["b_pre"].clone()} for r in range(tp)]
    for r, shard in enumerate(shards):
        if "log_threshold" in s:
            shard["log_threshold"] = s["log_threshold"].chunk(tp)[r]
        if "batchtopk_threshold" in s:
            shard["batchtopk_threshold"] = s["batchtopk_threshold"].clone()
    return shards


def _export(tmp_path, sae: ParallelSAE, hook="blocks.1.hook_resid_post", reshape="none", tp=2):
    merged = merge_tp_shards(_shards(sae, tp), "test")
    cfg = saelens_config(sae.cfg, 32, hook, reshape, META)
    return write_export(tmp_path / "sae", saelens_tensors(merged), cfg, {"kind": "test"}), cfg


@pytest.mark.parametrize("cfg", [
    SAEConfig(num_latents=64, k=5), SAEConfig(num_latents=48, activation="relu"),
    SAEConfig(num_latents=64, activation="jumprelu"), SAEConfig(num_latents=64, activation="batchtopk", k=5),
    SAEConfig(num_latents=64, activation="matryoshka", k=5, matryoshka_prefixes=(10, 40, 64)),
], ids=lambda c: c.activation)
def test_saelens_computes_tti_sae(tmp_path, cfg):
    from sae_lens import SAE

    sae = _sae(cfg)
    out, written = _export(tmp_path, sae)
    loaded = SAE.load_from_disk(out)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours = sae(x)
        f = loaded.encode(x)
        x_hat = loaded.decode(f)
    assert (f - ours.latents).abs().max().item() <= 1e-5
    assert (x_hat - ours.x_hat).abs().max().item() <= 1e-5
    assert torch.equal(f != 0, ours.latents != 0) and int((f != 0).sum()) > 0
    if cfg.activation in ("jumprelu", "batchtopk", "matryoshka"):
        assert written["architecture"] == "jumprelu" and type(loaded).__name__ == "JumpReLUSAE"
        pre = ours.pre
        assert int(((pre > 0) & (ours.latents == 0)).sum()) > 0  # the thresholds do cut positive latents
    # cfg.json is what SAELens's own save_model writes for this SAE, field for field.
    assert json.loads((out / "cfg.json").read_text()) == written
    loaded.save_model(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "cfg.json").read_text()) == written


def test_hook_z_reshape(tmp_path):
    """SAELens flattens TL's hook_z [.., n_heads, d_head] head-major: tti's attn.z layout."""
    from sae_lens import SAE

    sae = _sae(SAEConfig(num_latents=64, k=6), seed=3)
    out, _ = _export(tmp_path, sae, hook="blocks.0.attn.hook_z", reshape="hook_z")
    loaded = SAE.load_from_disk(out)
    z = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))  # tti: [B, T, heads * d_head]
    with torch.no_grad():
        ours = sae(z)
        recon = loaded(z.view(2, 5, 4, 8))  # TL: [B, T, heads, d_head]
    assert recon.shape == (2, 5, 4, 8)
    assert (recon.reshape(2, 5, 32) - ours.x_hat).abs().max().item() <= 1e-5


def test_merge_order_and_replicated_check():
    sae = _sae(SAEConfig(num_latents=64, k=5))
    merged = merge_tp_shards(_shards(sae, 4), "test")
    for name, t in sae.state_dict().items():
        assert torch.equal(merged[name], t), name
    bad = _shards(sae, 2)
    bad[1]["b_pre"] = bad[1]["b_pre"] + 1e-3
    with pytest.raises(ConfigError, match="b_pre differs between TP rank 0 and TP rank 1"):
        merge_tp_shards(bad, "test")


def test_write_is_atomic(tmp_path):
    tensors = {"W_enc": torch.zeros(4, 8)}
    out = write_export(tmp_path / "a", tensors, {"d_in": 4}, {"kind": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "tti_provenance.json"]
    assert len(json.loads((out / "tti_provenance.json").read_text())["weights_sha256"]) == 64
    with pytest.raises(ConfigError, match="already exists"):
        write_export(out, tensors, {}, {})
    with pytest.raises(TypeError):  # a failure half-way leaves neither the directory nor a temporary one
        write_export(tmp_path / "b", tensors, {"d_in": object()}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_cli_dispatches_sae_subcommands():
    from tti_dist.cli import build_parser, command_module

    parser = build_parser()
    assert command_module(parser.parse_args(["sae", "fit", "R", "--site", "s", "--latents", "8", "--k", "2"])) == "sae_fit"
    args = parser.parse_args(["sae", "export", "R", "--out", "D", "--name", "e", "--checkpoint", "4"])
    assert command_module(args) == "sae_export"
    assert (args.source, args.out, args.name, args.checkpoint) == ("R", "D", "e", "4")
    assert command_module(parser.parse_args(["export", "R", "--out", "m.safetensors"])) == "export"
