"""L1 activation sparsity: TP=2 equals TP=1 (value and gradients), and a reference written here."""

from __future__ import annotations

import os

import pytest
import torch

from spawn import run_ranks

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _dtype_acts(widths: list[tuple[str, int]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Whole (unsharded) activations [3, 16, width] of every (hookpoint, width) in `dtype`, the
    same on every rank, with exact zeros and both signs."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for name, width in widths:
        a = torch.randn(3, 16, width, generator=g, dtype=torch.float64)
        a[a.abs() < 0.3] = 0
        out[name] = a.to(dtype)
    return out


ENTRY = {"type": "l1", "name": "l1_test", "coefficient": 0.5,
         "hookpoints": ["blocks.*.mlp.act", "blocks.1.resid_post"],
         "schedule": {"kind": "linear_warmup", "warmup_steps": 4}}


def _l1_rank() -> dict:
    from tti_dist.capture import ActivationCapture
    from tti_dist.config.schema import ModelConfig
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT, tp_partition_dims
    from tti_dist.regularizers import build_regularizers, checked_regularizers
    from tti_dist.utils.seeding import seed_weights

    groups = init_parallel(int(os.environ["WORLD_SIZE"]), torch.device("cpu"), 120)
    try:
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, max_seq_len=16)
        seed_weights(3)
        model = GPT(cfg, groups)
        (reg,) = build_regularizers(checked_regularizers([ENTRY], cfg), model, groups)
        tokens = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(5))
        with ActivationCapture(reg.hookpoints) as cap:
            model(tokens)
            weighted, metrics = reg(cap.captured, step=1)  # warmup factor 2/4
            acts = {k: v.detach().clone() for k, v in cap.captured.items()}
        weighted.backward()
        # The loss on given activations of every float dtype: this rank's shard of each.
        by_dtype = {}
        widths = [(hp.name, hp.global_dim) for hp in reg.hookpoints]
        for dtype in DTYPES:
            local = {}
            for hp in reg.hookpoints:
                whole = _dtype_acts(widths, dtype)[hp.name]
                if hp.tp_sharded:
                    whole = whole.chunk(groups.tp_size, dim=-1)[groups.tp_rank]
                local[hp.name] = whole.clone().requires_grad_()
            loss, parts = reg.loss(local)
            loss.backward()
            by_dtype[dtype] = {"loss": loss.detach(), "l0": parts["l0"].detach(),
                               "grads": {k: v.grad for k, v in local.items()}}
        return {
            "tp_rank": groups.tp_rank, "weighted": weighted.detach(), "metrics": metrics, "acts": acts,
            "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
            "layout": tp_partition_dims(model), "by_dtype": by_dtype,
            "hookpoints": [(hp.name, hp.tp_sharded, hp.global_dim) for hp in reg.hookpoints],
        }
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def results():
    return run_ranks(1, _l1_rank)[0], run_ranks(2, _l1_rank)


def test_reference_value_and_schedule(results):
    ref, _ = results
    # float64 reference; the product sums in fp32 in its own order (1e-5 relative, as for TP)
    expected = torch.stack([a.double().abs().mean() for a in ref["acts"].values()]).mean().float()
    torch.testing.assert_close(ref["metrics"]["reg/l1_test/loss"], expected, rtol=1e-5, atol=0)
    assert ref["metrics"]["reg/l1_test/coefficient"].item() == pytest.approx(0.5 * 2 / 4)
    torch.testing.assert_close(ref["weighted"], 0.25 * expected, rtol=1e-5, atol=0)
    # GELU is never exactly zero: l0 is the mean width of the hookpoints (256 and 64 units).
    assert ref["metrics"]["reg/l1_test/l0"].item() == pytest.approx((256 + 256 + 64) / 3)


def test_tp2_equals_tp1_value_and_gradients(results):
    ref, ranks = results
    for r in ranks:
        torch.testing.assert_close(r["weighted"], ref["weighted"], rtol=1e-5, atol=0)
        torch.testing.assert_close(r["metrics"]["reg/l1_test/l0"], ref["metrics"]["reg/l1_test/l0"])
        assert r["grads"].keys() == ref["grads"].keys()
        for name, g in r["grads"].items():
            dim = r["layout"][name]
            expected = ref["grads"][name] if dim is None else ref["grads"][name].chunk(2, dim=dim)[r["tp_rank"]]
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")
    assert any(r["layout"][n] is not None for n in ranks[0]["grads"])  # sharded weights were compared


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_float_dtype_matches_a_float64_reference(results, dtype):
    """bf16, fp16, fp32 and fp64 activations at TP=1 and TP=2: the loss accumulates in at least
    fp32 (fp64 stays fp64) and equals mean |a| computed in fp64 from the same values; the
    gradient, in the activations' dtype, is sign(a) / (N D) / (number of hookpoints)."""
    ref, ranks = results
    hookpoints = ref["hookpoints"]
    whole = _dtype_acts([(n, d) for n, _, d in hookpoints], dtype)
    expected = torch.stack([whole[n].double().abs().mean() for n, _, _ in hookpoints]).mean()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for r in [ref, *ranks]:
        got = r["by_dtype"][dtype]
        assert got["loss"].dtype == acc
        torch.testing.assert_close(got["loss"], expected.to(acc), rtol=rtol, atol=0)
        expected_l0 = sum((whole[n] != 0).sum().item() / (3 * 16) for n, _, _ in hookpoints) / len(hookpoints)
        assert got["l0"].item() == pytest.approx(expected_l0, rel=1e-6)
        for name, sharded, dim in hookpoints:
            a = whole[name]
            if sharded:
                a = a.chunk(len(ranks) if r is not ref else 1, dim=-1)[r["tp_rank"]]
            grad = got["grads"][name]
            assert grad.dtype == dtype
            reference = (torch.sign(a.double()) / (3 * 16 * dim) / len(hookpoints)).to(dtype)
            torch.testing.assert_close(grad, reference, rtol=rtol if dtype == torch.float64 else 1e-2, atol=0)


def test_l1_training_lowers_activation_magnitude(tmp_path):
    """Through tti's trainer (TP=2, ZeRO-1): with the penalty on, the logged mean |mlp.act|
    ends lower than in the same run with coefficient 0 (which still logs the metric)."""
    import pyarrow.parquet as pq

    from tti_dist.config import load_config
    from tti_dist.data.build import build_dataset
    from tti_dist.regularizers.validation import validate_run_config
    from tti_dist.train.worker import launch_local

    build_dataset("stdlib", tmp_path / "data", max_bytes=300_000, val_fraction=0.05)
    final = {}
    for coefficient in (0.0, 1.0):
        cfg = load_config(None, [
            "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.max_seq_len=32",
            "parallel.tp_size=2", "zero.stage=1", "train.steps=15", "optim.warmup_steps=2",
            "train.micro_batch_size=4", "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
            "logging.progress_bar=false", "data.seq_len=32", f"data.path={tmp_path / 'data'}",
            "regularizers=[{type: l1, name: l1_mlp, coefficient: %s, hookpoints: ['blocks.*.mlp.act']}]" % coefficient,
        ])
        validate_run_config(cfg, world_size=2)
        run_dir = tmp_path / f"run{coefficient}"
        launch_local(cfg, str(run_dir), nproc=2)
        table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
        for tag in ("reg/l1_mlp/loss", "reg/l1_mlp/coefficient", "reg/l1_mlp/l0", "train/total_loss"):
            assert tag in table, tag
        assert table["reg/l1_mlp/coefficient"][-1] == coefficient
        final[coefficient] = table["reg/l1_mlp/loss"][-1]
        if coefficient:
            # total = task + coefficient * l1, per step (both DP-averaged means)
            for task, l1, total in zip(table["train/task_loss"], table["reg/l1_mlp/loss"], table["train/total_loss"]):
                assert total == pytest.approx(task + coefficient * l1, rel=1e-5)
    assert final[1.0] < 0.7 * final[0.0]
