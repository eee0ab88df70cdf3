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
    from tti_dist.distributed.runtime import init_parallel, shutdown_parallel
    from tti_dist.models import GPT, lm_loss, tp_partition_dims
    from tti_dist.train.seeding import seed_weights

    groups = init_parallel(_world(), torch.device("cpu"), 120)
    try:
        out = {}
        for name, kwargs in variant_kwargs.items():
            cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, max_seq_len=16, **kwargs)
            seed_weights(7)
            model = GPT(cfg, groups.tp_group)
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
