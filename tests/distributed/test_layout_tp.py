"""The model layout (tti_dist.models.layout) against models built at TP=2, on real gloo ranks.

Each rank builds dense/top-k, bottleneck and mixed dense/MoE GPTs at tensor-parallel size 2
and reports its parameters' local shapes and sharding attributes, its hookpoints and its
linear layers' global sizes; each must be what the layout, derived from the config alone,
says a TP=2 rank holds (tests/unit/test_layout.py checks the TP=1 models in full).
"""

from __future__ import annotations

import pytest
import torch

from spawn import run_ranks

BASE = dict(num_layers=2, hidden_size=32, num_heads=4, max_seq_len=16, vocab_size=64, vocab_pad_multiple=64)
CONFIGS = {
    "topk": dict(BASE, mlp_topk=8, ffn_hidden_size=48, tie_embeddings=False),
    "bottleneck": dict(BASE, bottleneck_layer=1, bottleneck_dim=8, bias=False),
    "mixed": dict(BASE, num_layers=4, moe_num_experts=2, moe_layer_interval=2, moe_ffn_hidden_size=48,
                  moe_min_capacity=1, bottleneck_layer=0, bottleneck_dim=8),
}


def _built_layouts() -> dict:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from tti_dist.capture import list_hookpoints
    from tti_dist.config.schema import ModelConfig
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT
    from tti_dist.utils.seeding import seed_weights

    groups = init_parallel(2, torch.device("cpu"), 120)
    try:
        out = {}
        for name, kwargs in CONFIGS.items():
            seed_weights(7)
            model = GPT(ModelConfig(**kwargs), groups.with_experts(1))
            out[name] = {
                "tp_size": groups.tp_size,
                "parameters": [(n, tuple(p.shape),
                                int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None)
                               for n, p in model.named_parameters()],
                "hookpoints": [(hp.name, hp.global_dim, hp.tp_sharded) for hp in list_hookpoints(model)],
                "linears": {n: (m.output_size, m.input_size) for n, m in model.named_modules()
                            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and n.startswith("blocks.")},
            }
        return out
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def results():
    return run_ranks(2, _built_layouts)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp2_model_has_the_layout(results, name):
    from tti_dist.config.schema import ModelConfig
    from tti_dist.models.layout import model_layout

    layout = model_layout(ModelConfig(**CONFIGS[name]))
    for rank in results:
        built = rank[name]
        assert built["tp_size"] == 2
        assert [(p.name, p.local_shape(2), p.tp_dim) for p in layout.parameters] == built["parameters"]
        assert [(h.name, h.width, h.tp_sharded) for h in layout.hookpoints] == built["hookpoints"]
        tp_linears = {lin.name: lin.weight_shape for lin in layout.linears if lin.parallel is not None}
        assert tp_linears == built["linears"]
