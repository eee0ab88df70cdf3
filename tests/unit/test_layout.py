"""The model layout (tti_dist.models.layout) against built models, and its users.

For dense, top-k, MoE, mixed dense/MoE and bottleneck configs, the layout derived from the
config alone must be exactly what a built GPT has: hookpoint names, widths, TP sharding and
dtype; every parameter's name, global shape, TP-split dimension and expert flag; every
linear layer's module, shape, parallel kind and bias; and count_parameters. TP=2 shards are
checked in tests/distributed/test_layout_tp.py.

A size-1 gloo process group, megatron's parallel_state (and DeepSpeed's expert groups for
the MoE models) are set up once for the module.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.models.layout import model_layout

BASE = dict(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16, vocab_size=64, vocab_pad_multiple=64)

CONFIGS = {
    "dense": ModelConfig(**BASE),
    "dense_rope_untied_nobias": ModelConfig(**{**BASE, "position_embedding": "rope", "tie_embeddings": False,
                                               "bias": False, "ffn_hidden_size": 48}),
    "topk_masked": ModelConfig(**{**BASE, "mlp_topk": 8, "mlp_mask_density": 0.5, "mlp_activation": "relu"}),
    "bottleneck": ModelConfig(**{**BASE, "num_layers": 3, "bottleneck_layer": 1, "bottleneck_dim": 8}),
    "bottleneck_nobias": ModelConfig(**{**BASE, "bottleneck_layer": 0, "bottleneck_dim": 8, "bias": False}),
    "moe_top2": ModelConfig(**{**BASE, "moe_num_experts": 4, "moe_top_k": 2, "moe_min_capacity": 1}),
    "mixed": ModelConfig(**{**BASE, "num_layers": 4, "moe_num_experts": 2, "moe_layer_interval": 2,
                            "moe_ffn_hidden_size": 48, "moe_min_capacity": 1, "mlp_topk": 16,
                            "bottleneck_layer": 2, "bottleneck_dim": 8, "tie_embeddings": False}),
}


@pytest.fixture(scope="module")
def models(groups):
    from tti_dist.models.gpt import GPT

    built = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        built[name] = GPT(cfg, groups.with_experts(1))
    return built


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hookpoints_equal_the_built_model(models, name):
    from tti_dist.capture import ActivationCapture, list_hookpoints

    cfg, model = CONFIGS[name], models[name]
    layout = model_layout(cfg)
    built = list_hookpoints(model)
    assert [(h.name, h.width, h.tp_sharded) for h in layout.hookpoints] == \
        [(hp.name, hp.global_dim, hp.tp_sharded) for hp in built]
    # is_float: what the forward actually puts there.
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ActivationCapture(built) as cap:
        model(tokens)
        dtypes = {n: t.dtype for n, t in cap.captured.items()}
    for h in layout.hookpoints:
        assert dtypes[h.name].is_floating_point is h.is_float, h.name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameters_and_count_equal_the_built_model(models, name):
    from tti_dist.models.gpt import count_parameters

    cfg, model = CONFIGS[name], models[name]
    layout = model_layout(cfg)
    built = [(n, tuple(p.shape), int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None,
              getattr(p, "allreduce", True) is False) for n, p in model.named_parameters()]
    assert [(p.name, p.shape, p.tp_dim, p.expert) for p in layout.parameters] == built
    assert count_parameters(cfg) == layout.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_layers_equal_the_built_model(models, name):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torch import nn

    cfg, model = CONFIGS[name], models[name]
    layout = model_layout(cfg)
    kinds = {ColumnParallelLinear: "column", RowParallelLinear: "row", nn.Linear: None}
    built = {}
    for path, module in model.named_modules():
        for cls, kind in kinds.items():
            if isinstance(module, cls) and path.startswith("blocks."):
                built[path] = module, kind
    assert [lin.name for lin in layout.linears] == list(built)
    for lin in layout.linears:
        module, kind = built[lin.name]
        assert lin.parallel == kind, lin.name
        if kind is None:
            assert (module.out_features, module.in_features) == lin.weight_shape
        else:  # megatron's global sizes
            assert (module.output_size, module.input_size) == lin.weight_shape
        assert tuple(module.weight.shape) == lin.weight_shape  # TP=1: the shard is everything
        assert (module.bias is not None) is lin.bias, lin.name
        assert lin.num_directions == (lin.in_features if kind == "row" else lin.out_features)


def test_block_kinds():
    mixed = model_layout(CONFIGS["mixed"])
    assert [b.kind for b in mixed.blocks] == ["dense", "moe", "dense", "moe"]
    assert [b.mlp_topk for b in mixed.blocks] == [16, 0, 16, 0]
    assert [b.has_bottleneck for b in mixed.blocks] == [False, False, True, False]
    roles = [lin.role for lin in mixed.blocks[1].linears]
    assert roles == ["attn.qkv", "attn.proj", "moe.router"] + ["moe.expert.fc1", "moe.expert.fc2"] * 2
    assert [lin.expert for lin in mixed.blocks[1].linears][3:] == [0, 0, 1, 1]
    assert mixed.linear("blocks.1.moe.layer.deepspeed_moe.experts.deepspeed_experts.1.fc1").weight_shape == (48, 32)
    assert mixed.hookpoint("blocks.2.bottleneck.z").width == 8
    with pytest.raises(KeyError):
        mixed.hookpoint("blocks.1.mlp.act")


def test_layout_imports_no_megatron():
    """Config validation uses the layout, and commands check run directories and eval plans,
    before megatron or DeepSpeed may be imported."""
    code = ("import sys, tti_dist.models.layout, tti_dist.rundir, tti_dist.eval.plan, tti_dist.commands.train; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'deepspeed')]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- its users


def orthogonality(weights, cfg, tp_size=1):
    from tti_dist.regularizers import checked_regularizers

    return checked_regularizers([{"type": "orthogonality", "weights": weights}], cfg, tp_size)


def test_orthogonality_targets_every_tp_linear_outside_moe_layers():
    from tti_dist.regularizers.orthogonality import targetable_layers

    cfg = CONFIGS["mixed"]
    assert list(targetable_layers(cfg)) == [
        "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
        "blocks.1.attn.qkv", "blocks.1.attn.proj",
        "blocks.2.attn.qkv", "blocks.2.attn.proj", "blocks.2.mlp.fc1", "blocks.2.mlp.fc2",
        "blocks.2.bottleneck.enc_mu", "blocks.2.bottleneck.enc_logvar", "blocks.2.bottleneck.dec",
        "blocks.3.attn.qkv", "blocks.3.attn.proj",
    ]
    orthogonality(["blocks.*.mlp.fc1"], cfg)  # matches the dense blocks 0 and 2


def test_orthogonality_on_moe_mlp_is_a_config_error():
    cfg = ModelConfig(moe_num_experts=2)  # every block MoE
    with pytest.raises(ConfigError) as info:
        orthogonality(["blocks.*.mlp.fc1"], cfg)
    assert str(info.value) == (
        "regularizers[0].weights[0]: 'blocks.*.mlp.fc1' matches no linear layer (blocks 0..3 are MoE blocks with "
        "model.moe_num_experts 2: no mlp.fc1 / mlp.fc2, and their experts are not targetable); "
        "available: blocks.{0..3}.attn.qkv, blocks.{0..3}.attn.proj")
    with pytest.raises(ConfigError, match=r"^regularizers\[0\]\.weights\[0\]: 'blocks.1.mlp.fc2' matches no linear "
                                          r"layer \(block 1 is an MoE block"):
        orthogonality(["blocks.1.mlp.fc2"], CONFIGS["mixed"])
    with pytest.raises(ConfigError, match=r"matches no linear layer; available: .*blocks.\{0,2\}.mlp.fc1"):
        orthogonality(["blocks.*.moe.*"], CONFIGS["mixed"])


def test_orthogonality_on_bottleneck_and_mlp_equals_reference(models, groups):
    """The penalty on layers found through the layout: mean over matrices of the mean squared
    off-diagonal cosine of their directions (rows of enc_mu / fc1, columns of dec)."""
    from tti_dist.regularizers import build_regularizers, checked_regularizers

    cfg, model = CONFIGS["mixed"], models["mixed"]
    specs = checked_regularizers([{"type": "orthogonality", "coefficient": 1.0,
                                   "weights": ["blocks.2.bottleneck.enc_mu", "blocks.2.bottleneck.dec", "blocks.0.mlp.fc1"]}],
                                 cfg)
    [reg] = build_regularizers(specs, model, groups)
    try:
        model.train()
        model(torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2)))
        value, _ = reg.loss({})
    finally:
        reg.remove_hooks()
        model.eval()

    def penalty(dirs: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(dirs.detach().float(), dim=1)
        gram = unit @ unit.t()
        n = gram.shape[0]
        return (gram.square().sum() - gram.diagonal().square().sum()) / (n * (n - 1))

    blocks = model.blocks
    expected = torch.stack([penalty(blocks[2].bottleneck.enc_mu.weight), penalty(blocks[2].bottleneck.dec.weight.t()),
                            penalty(blocks[0].mlp.fc1.weight)]).mean()
    torch.testing.assert_close(value.detach(), expected)


def test_regularizer_hookpoint_globs_use_the_layout():
    from tti_dist.regularizers import checked_regularizers

    cfg = CONFIGS["mixed"]
    with pytest.raises(ConfigError, match=r"^regularizers\[0\]\.hookpoints\[0\]: 'blocks.1.mlp.act' matches no "
                                          r"hookpoint; available: .*blocks.\{0,2\}.mlp.act"):
        checked_regularizers([{"type": "l1", "hookpoints": ["blocks.1.mlp.act"]}], cfg)
    # An SAE needs a replicated float site; the hint lists this model's (moe.out in MoE blocks).
    with pytest.raises(ConfigError, match=r"^regularizers\[0\]\.hookpoints: blocks.0.mlp.act is split across .*"
                                          r"blocks.\{1,3\}.moe.out"):
        checked_regularizers([{"type": "sae", "hookpoints": ["blocks.0.mlp.act"], "num_latents": 8, "k": 2}], cfg)
