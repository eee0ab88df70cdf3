"""TP=2 equals TP=1 from the same seed: weights, logits, loss and gradients (real gloo ranks).

Each rank builds the GPT on megatron-core TP layers with the product's seeding, runs one
forward/backward on fixed tokens, and returns its local weights, gathered logits, loss
and local gradients. The TP=2 shards must be exact slices of the TP=1 tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from spawn import run_ranks

VARIANTS = {
    "learned_tied": dict(position_embedding="learned", tie_embeddings=True),
    "rope_untied": dict(position_embedding="rope", tie_embeddings=False),
}


def _forward_backward(variant_kwargs: dict) -> dict:
    from tti_dist.config.schema import ModelConfig
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT, lm_loss, tp_partition_dims
    from tti_dist.utils.seeding import seed_weights

    groups = init_parallel(_world(), torch.device("cpu"), 120)
    try:
        out = {}
        for name, kwargs in variant_kwargs.items():
            cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, max_seq_len=16, **kwargs)
            seed_weights(7)
            model = GPT(cfg, groups)
            tokens = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(11))
            logits_local = model(tokens[:, :-1])
            loss = lm_loss(logits_local, tokens[:, 1:]).mean()
            loss.backward()
            pieces = [torch.empty_like(logits_local) for _ in range(groups.tp_size)]
            dist.all_gather(pieces, logits_local.detach().contiguous(), group=groups.tp_group)
            out[name] = {
                "tp_rank": groups.tp_rank,
                "logits": torch.cat(pieces, dim=-1),
                "loss": loss.detach(),
                "weights": {k: v.detach().clone() for k, v in model.named_parameters()},
                "grads": {k: v.grad.clone() for k, v in model.named_parameters()},
                "layout": tp_partition_dims(model),
            }
        return out
    finally:
        shutdown_parallel()


def _world() -> int:
    import os

    return int(os.environ["WORLD_SIZE"])


@pytest.fixture(scope="module")
def tp_results():
    tp1 = run_ranks(1, _forward_backward, VARIANTS)
    tp2 = run_ranks(2, _forward_backward, VARIANTS)
    return tp1[0], tp2


def _shard(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    return full if dim is None else full.chunk(size, dim=dim)[rank]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_loss_match(tp_results, variant):
    ref, ranks = tp_results[0][variant], [r[variant] for r in tp_results[1]]
    for r in ranks:
        torch.testing.assert_close(r["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["loss"], ref["loss"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_independent_of_tp_size(tp_results, variant):
    ref, ranks = tp_results[0][variant], [r[variant] for r in tp_results[1]]
    for r in ranks:
        assert r["weights"].keys() == ref["weights"].keys()
        for name, w in r["weights"].items():
            expected = _shard(ref["weights"][name], r["layout"][name], r["tp_rank"], 2)
            assert torch.equal(w, expected), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_of_matching_shards(tp_results, variant):
    ref, ranks = tp_results[0][variant], [r[variant] for r in tp_results[1]]
    sharded = 0
    for r in ranks:
        for name, g in r["grads"].items():
            dim = r["layout"][name]
            sharded += dim is not None
            expected = _shard(ref["grads"][name], dim, r["tp_rank"], 2)
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert sharded > 0  # the comparison covered TP-sharded parameters, not only replicated ones


def _linear_paths() -> dict:
    """ColumnLinear/RowLinear on this rank: which path they take, and at TP=1 their output and
    gradients against megatron-core's own forward (the parent class's) on the same weights."""
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.blocks import normal_init
    from tti_dist.models.gpt import megatron_config
    from tti_dist.models.parallel_linear import ColumnLinear, RowLinear

    groups = init_parallel(_world(), torch.device("cpu"), 120)
    try:
        torch.manual_seed(3)
        cfg = megatron_config(groups.tp_size)
        col = ColumnLinear(32, 64, config=cfg, init_method=normal_init(0.5), bias=True, gather_output=False,
                           tp_group=groups.tp_group)
        row = RowLinear(64, 32, config=cfg, init_method=normal_init(0.5), bias=True, input_is_parallel=True,
                        skip_bias_add=False, tp_group=groups.tp_group)
        with torch.no_grad():  # megatron initialises biases to 0; make them matter
            col.bias.normal_()
            row.bias.normal_()
        out = {"plain": (col.plain_linear, row.plain_linear)}
        if groups.tp_size == 1:
            x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(4))
            results = []
            for col_fwd, row_fwd in ((col.forward, row.forward),
                                     (lambda t: super(ColumnLinear, col).forward(t),
                                      lambda t: super(RowLinear, row).forward(t))):
                xi = x.clone().requires_grad_(True)
                y = row_fwd(torch.relu(col_fwd(xi)[0]))[0]
                y.square().sum().backward()
                results.append((y.detach(), xi.grad, [p.grad.clone() for p in (*col.parameters(), *row.parameters())]))
                col.zero_grad(set_to_none=True)
                row.zero_grad(set_to_none=True)
            out["fast"], out["megatron"] = results
        return out
    finally:
        shutdown_parallel()


def test_tp1_linear_fast_path_equals_megatron_layers():
    """At TP=1 the layers compute F.linear; values and gradients equal megatron-core's path."""
    (tp1,) = run_ranks(1, _linear_paths)
    assert tp1["plain"] == (True, True)
    fast, megatron = tp1["fast"], tp1["megatron"]
    torch.testing.assert_close(fast[0], megatron[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast[1], megatron[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(fast[2], megatron[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    tp2 = run_ranks(2, _linear_paths)
    assert all(r["plain"] == (False, False) for r in tp2)  # TP=2 keeps megatron's communicating path
