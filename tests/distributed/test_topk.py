"""Distributed top-k MLP activation and the fixed hard mask: TP=2 and TP=4 equal TP=1 (real gloo ranks).

(a) `topk_mask` on TP shards selects exactly the units a single rank selects on the whole
    tensor, ties included, for k below, at and above the local width, by value and by |value|.
(b) A GPT with mlp_topk at TP=2 equals TP=1 (logits, loss, gradients of matching shards) and
    `mlp.act` holds exactly the reference top-k of GELU(mlp.pre) per token.
(c) The hard mask (with and without top-k): the same units at TP=1 and TP=2, zero on every
    token, zero fc1 gradient for masked units, TP=2 equal to TP=1; weights unchanged by the mask.
(d) AbsTopK activation sparsity at every site (q, k and v sharded by head, the rest
    replicated): TP=2 equals TP=1, and each hooked site keeps exactly k entries per token.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from spawn import run_ranks

WIDTH = 24  # global width of the kernel cases: local 12 at TP=2, 6 at TP=4
KERNEL_CASES = [
    (dtype, by, k, kind)
    for dtype in ("float32", "bfloat16")
    for by in ("value", "abs")
    for k in (1, 4, 6, 12, 17, 24)
    for kind in ("ties", "randn")
]
MODEL_VARIANTS = {
    "topk": dict(mlp_topk=8),
    "topk_abs": dict(mlp_topk=8, mlp_topk_by="abs"),
    "mask": dict(mlp_mask_density=0.5, mlp_mask_seed=5),
    "mask_topk": dict(mlp_mask_density=0.5, mlp_mask_seed=5, mlp_topk=8),
    "abs_topk_act": dict(abs_topk_fraction=0.25, abs_topk_sites=("attn_in", "attn_q", "attn_k", "attn_v", "attn_out",
                                                                 "mlp_in", "mlp_out", "resid_mid", "resid_post")),
}
ABS_TOPK_HOOKS = ["blocks.*.attn.out", "blocks.*.resid_mid", "blocks.*.mlp.out", "blocks.*.resid_post"]
K = 8
FFN = 128


def _kernel_input(dtype: str, kind: str, seed: int) -> torch.Tensor:
    """[4, 5, WIDTH]: small integers in -3..3 (heavy ties, also between v and -v) or normals;
    row [0, 0] is constant (every unit tied) and row [0, 1] ties only inside rank 0's slice."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        x = torch.randint(-3, 4, (4, 5, WIDTH), generator=g).float()
    else:
        x = torch.randn(4, 5, WIDTH, generator=g)
    x[0, 0] = 1.0
    x[0, 1] = -1.0
    x[0, 1, :WIDTH // 4] = 2.0
    return x.to(getattr(torch, dtype))


def _reference_topk(x: torch.Tensor, k: int, by: str) -> torch.Tensor:
    """First k units per row in (key desc, index asc) order: a stable descending sort."""
    key = x.abs() if by == "abs" else x
    idx = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(key, dtype=torch.bool).scatter_(-1, idx, True)


def _gather_last(t: torch.Tensor, group, size: int) -> torch.Tensor:
    import torch.distributed as dist

    t = t.detach().contiguous()
    pieces = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(pieces, t, group=group)
    return torch.cat(pieces, dim=-1)


def _rank(run_model: bool) -> dict:
    from tti_dist.capture import ActivationCapture, resolve_hookpoints
    from tti_dist.config.schema import ModelConfig
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT, lm_loss, tp_partition_dims
    from tti_dist.models.sparsity import topk_mask
    from tti_dist.utils.seeding import seed_weights

    groups = init_parallel(int(os.environ["WORLD_SIZE"]), torch.device("cpu"), 120)
    tp, r = groups.tp_size, groups.tp_rank
    try:
        out = {"tp_rank": r, "kernel": {}, "model": {}}
        for i, (dtype, by, k, kind) in enumerate(KERNEL_CASES):
            local = _kernel_input(dtype, kind, seed=i).chunk(tp, dim=-1)[r]
            mask = topk_mask(local, k, by=by, tp_group=groups.tp_group, tp_size=tp, tp_rank=r)
            assert mask.dtype == torch.bool and mask.shape == local.shape
            out["kernel"][i] = _gather_last(mask, groups.tp_group, tp)
        if not run_model:
            return out
        for name, kwargs in MODEL_VARIANTS.items():
            cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=FFN, max_seq_len=16,
                              **kwargs)
            seed_weights(7)
            model = GPT(cfg, groups)
            hps = resolve_hookpoints(model, ["blocks.*.mlp.pre", "blocks.*.mlp.act"]
                                     + (ABS_TOPK_HOOKS if "abs_topk_fraction" in kwargs else []), "test")
            tokens = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(11))
            with ActivationCapture(hps) as cap:
                logits = model(tokens[:, :-1])
                # mlp.pre/act are sharded by unit; the AbsTopK hooks are replicated.
                acts = {n: _gather_last(a, groups.tp_group, tp) if n.endswith(("pre", "act")) else a.detach()
                        for n, a in cap.captured.items()}
            loss = lm_loss(logits, tokens[:, 1:]).mean()
            loss.backward()
            out["model"][name] = {
                "logits": _gather_last(logits, groups.tp_group, tp),
                "loss": loss.detach(),
                "acts": acts,
                "unit_masks": {n: _gather_last(b, groups.tp_group, tp)
                               for n, b in model.named_buffers() if n.endswith("unit_mask")},
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                "layout": tp_partition_dims(model),
            }
        return out
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def results():
    return run_ranks(1, _rank, True)[0], run_ranks(2, _rank, True), run_ranks(4, _rank, False)


# (a) the kernel ------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_topk_mask_tp_equals_tp1_reference(results, tp):
    from tti_dist.models.sparsity import topk_mask

    ref1, ranks2, ranks4 = results
    ranks = {1: [ref1], 2: ranks2, 4: ranks4}[tp]
    for i, (dtype, by, k, kind) in enumerate(KERNEL_CASES):
        x = _kernel_input(dtype, kind, seed=i)
        expected = topk_mask(x, k, by=by)  # the tp_size = 1 path on the concatenated tensor
        assert torch.equal(expected, _reference_topk(x, k, by)), (dtype, by, k, kind)
        assert torch.equal(expected.sum(-1), torch.full(x.shape[:-1], k))
        for r in ranks:
            assert torch.equal(r["kernel"][i], expected), (tp, r["tp_rank"], dtype, by, k, kind)


def test_kernel_cases_cover_k_relative_to_local_width():
    ks = {k for _, _, k, _ in KERNEL_CASES}
    for local in (WIDTH // 2, WIDTH // 4):
        assert any(k < local for k in ks) and local in ks and any(local < k < WIDTH for k in ks) and WIDTH in ks


# (b), (c) the model --------------------------------------------------------------------------


def _shard(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    return full if dim is None else full.chunk(size, dim=dim)[rank]


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_model_tp2_equals_tp1(results, variant):
    ref, ranks, _ = results
    ref = ref["model"][variant]
    sharded = 0
    for r in ranks:
        m = r["model"][variant]
        torch.testing.assert_close(m["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m["loss"], ref["loss"], rtol=1e-5, atol=0)
        for name, a in m["acts"].items():
            torch.testing.assert_close(a, ref["acts"][name], rtol=1e-5, atol=1e-7)
            if name.endswith("act") or variant == "abs_topk_act":
                assert torch.equal(a != 0, ref["acts"][name] != 0), name  # same units selected
        for name, g in m["grads"].items():
            dim = m["layout"][name]
            sharded += dim is not None
            torch.testing.assert_close(g, _shard(ref["grads"][name], dim, r["tp_rank"], 2),
                                       rtol=1e-5, atol=1e-7, msg=lambda s: f"{name}: {s}")
    assert sharded > 0


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_mlp_act_is_reference_topk_of_masked_gelu(results, variant):
    """mlp.act == GELU(mlp.pre) * hard_mask, restricted to its reference top-k (TP=1 and TP=2)."""
    from tti_dist.models.sparsity import hard_mask_units

    kwargs = MODEL_VARIANTS[variant]
    k, by = kwargs.get("mlp_topk", 0), kwargs.get("mlp_topk_by", "value")
    ref, ranks, _ = results
    for m in [ref["model"][variant]] + [r["model"][variant] for r in ranks]:
        for layer in range(2):
            pre, act = m["acts"][f"blocks.{layer}.mlp.pre"], m["acts"][f"blocks.{layer}.mlp.act"]
            expected = F.gelu(pre)
            if "mlp_mask_density" in kwargs:
                expected = expected * hard_mask_units(FFN, 0.5, kwargs["mlp_mask_seed"], layer)
            if k:
                expected = expected * _reference_topk(expected, k, by)
            torch.testing.assert_close(act, expected, rtol=1e-6, atol=0)
            l0 = (act != 0).sum(-1)
            if k and "mlp_mask_density" not in kwargs:
                assert torch.equal(l0, torch.full_like(l0, k)), (variant, layer)  # GELU is never exactly 0
            elif k:
                assert int(l0.max()) <= k and float(l0.float().mean()) > k - 1


@pytest.mark.parametrize("variant", ["mask", "mask_topk"])
def test_hard_mask_same_units_zero_acts_and_zero_fc1_gradient(results, variant):
    from tti_dist.models.sparsity import hard_mask_units

    ref, ranks, _ = results
    seed = MODEL_VARIANTS[variant]["mlp_mask_seed"]
    masks = [hard_mask_units(FFN, 0.5, seed, layer) for layer in range(2)]
    assert not torch.equal(masks[0], masks[1])
    for m, rank, size in [(ref["model"][variant], 0, 1)] + [(r["model"][variant], r["tp_rank"], 2) for r in ranks]:
        assert sorted(m["unit_masks"]) == ["blocks.0.mlp.unit_mask", "blocks.1.mlp.unit_mask"]
        for layer, full in enumerate(masks):
            assert torch.equal(m["unit_masks"][f"blocks.{layer}.mlp.unit_mask"], full)  # same units at every TP
            assert int(full.sum()) == FFN // 2
            act = m["acts"][f"blocks.{layer}.mlp.act"]
            assert not act[..., ~full].any()  # masked units are zero on every token
            assert act[..., full].ne(0).any()
            local = full.chunk(size)[rank]
            g_w, g_b = m["grads"][f"blocks.{layer}.mlp.fc1.weight"], m["grads"][f"blocks.{layer}.mlp.fc1.bias"]
            assert g_w.shape[0] == local.numel()
            assert not g_w[~local].any() and not g_b[~local].any()
            assert g_w[local].ne(0).any()


def test_abs_topk_sites_keep_exactly_k_per_token(results):
    """hidden 32 x fraction 0.25 = 8 entries per token at every hooked site, at TP=1 and TP=2;
    the all-site model differs from the dense one (the option acts)."""
    ref, ranks, _ = results
    for m in [ref["model"]["abs_topk_act"]] + [r["model"]["abs_topk_act"] for r in ranks]:
        hooked = [n for n in m["acts"] if not n.split(".")[-1] in ("pre", "act")]
        assert len(hooked) == 8
        for name in hooked:
            l0 = (m["acts"][name] != 0).sum(-1)
            assert torch.equal(l0, torch.full_like(l0, 8)), name
    assert not torch.allclose(ref["model"]["abs_topk_act"]["logits"], ref["model"]["topk"]["logits"], atol=1e-2)


def test_mask_does_not_change_weights(results):
    ref = results[0]["model"]
    for variant in ("mask", "mask_topk", "topk_abs", "abs_topk_act"):
        for name, w in ref[variant]["weights"].items():
            assert torch.equal(w, ref["topk"]["weights"][name]), (variant, name)
