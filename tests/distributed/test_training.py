"""Multi-rank training through the product's launcher, DeepSpeed ZeRO and megatron-core TP.

Runs (each a real job of 2 or 4 gloo ranks on a tiny GPT, 20 optimizer steps, checkpoints
at 10 and 20) are made once per module and shared by the tests:
    tp1_dp2_z1   TP=1 x DP=2, ZeRO-1   (the dense reference for TP)
    tp2_dp2_z{0,1,2,3}  TP=2 x DP=2, ZeRO stage 0..3
    tp2_dp2_z1_reg  TP=2 x DP=2, ZeRO-1 with regularizers and weight sparsity
    tp1_dp2_z2_ws   TP=1 x DP=2, ZeRO-2 with weight sparsity
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from spawn import run_ranks
from tti_dist.config import load_config
from tti_dist.data.build import build_dataset
from tti_dist.regularizers.validation import validate_run_config
from tti_dist.train.worker import launch_local

pytestmark = pytest.mark.slow

STEPS = 20
BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.max_seq_len=32",
    "optim.lr=3e-3", "optim.warmup_steps=3", "optim.grad_clip=1.0",
    f"train.steps={STEPS}", "train.micro_batch_size=4", "train.eval_every=10", "train.eval_batches=2",
    "data.seq_len=32",
    "logging.progress_bar=false", "checkpoint.every=10", "checkpoint.keep_last=0",
]
LAYOUTS = {
    "tp1_dp2_z1": dict(tp=1, dp=2, zero=1),
    "tp2_dp2_z0": dict(tp=2, dp=2, zero=0),
    "tp2_dp2_z1": dict(tp=2, dp=2, zero=1),
    "tp2_dp2_z2": dict(tp=2, dp=2, zero=2),
    "tp2_dp2_z3": dict(tp=2, dp=2, zero=3),
    # Regularizers whose samplers are keyed on call counters (checkpointed in client_state).
    "tp2_dp2_z1_reg": dict(tp=2, dp=2, zero=1, extra=(
        "regularizers=[{type: l1, name: l1, coefficient: 0.01, hookpoints: ['blocks.*.mlp.act']},"
        " {type: orthogonality, name: orth, coefficient: 0.1, weights: ['blocks.*.mlp.fc1'], mode: sampled_global, k: 8},"
        " {type: decorrelation, name: decorr, coefficient: 0.1, hookpoints: ['blocks.1.resid_post'], max_tokens: 16}]",
        # Weight sparsity too: its mask is a function of the weights and the step, so a resumed
        # run must continue exactly, and ZeRO-1's fp32 master weights must stay masked.
        "weight_sparsity={density: 0.25, anneal_fraction: 0.5, min_per_neuron: 2}",
    )),
    # Weight sparsity under ZeRO-2: the masks reach the fp32 master partitions.
    "tp1_dp2_z2_ws": dict(tp=1, dp=2, zero=2, extra=(
        "weight_sparsity={density: 0.25, anneal_fraction: 0.5, min_per_neuron: 2}",)),
}


# Spawned ranks re-import this module; the environment (inherited) carries the parent's path.
DATASET_DIR = Path(os.environ.setdefault(
    "TTI_TEST_DATASET_DIR", str(Path(tempfile.gettempdir()) / f"tti-test-stdlib-byte-{os.getpid()}")))


def dataset_path() -> str:
    """One byte-level stdlib dataset for every run of this module (built by the fixture below)."""
    return str(DATASET_DIR)


def make_config(tp: int, dp: int, zero: int, extra: tuple[str, ...] = ()):
    cfg = load_config(None, BASE + [f"parallel.tp_size={tp}", f"parallel.dp_size={dp}", f"zero.stage={zero}",
                                    f"data.path={dataset_path()}", *extra])
    validate_run_config(cfg, world_size=tp * dp)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def _dataset():
    build_dataset("stdlib", DATASET_DIR, tokenizer="byte", val_fraction=0.05, max_bytes=600_000, overwrite=True)
    yield
    shutil.rmtree(DATASET_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Lazily trained runs: runs(name) -> (run_dir, TrainResult of rank 0)."""
    root = tmp_path_factory.mktemp("runs")
    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            layout = LAYOUTS[name]
            cfg = make_config(**layout)
            run_dir = root / name
            results = launch_local(cfg, str(run_dir), nproc=layout["tp"] * layout["dp"])
            # Every rank reports the same DP-averaged losses.
            assert all(r.losses == results[0].losses for r in results.values())
            cache[name] = (run_dir, results[0])
        return cache[name]

    return get


def _curve(result) -> list[float]:
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    return [result.losses[s] for s in range(1, STEPS + 1)]


def test_loss_falls(runs):
    _, result = runs("tp2_dp2_z0")
    curve = _curve(result)
    assert curve[-1] < curve[0] - 1.0
    assert result.eval_losses[20] < result.eval_losses[10]


def test_tp2_follows_tp1_curve(runs):
    _, tp1 = runs("tp1_dp2_z1")
    _, tp2 = runs("tp2_dp2_z1")
    torch.testing.assert_close(torch.tensor(_curve(tp2)), torch.tensor(_curve(tp1)), rtol=1e-4, atol=0)
    for step in (10, 20):
        assert tp2.eval_losses[step] == pytest.approx(tp1.eval_losses[step], rel=1e-4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_follows_zero0(runs, stage):
    _, ref = runs("tp2_dp2_z0")
    _, result = runs(f"tp2_dp2_z{stage}")
    torch.testing.assert_close(torch.tensor(_curve(result)), torch.tensor(_curve(ref)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["tp2_dp2_z0", "tp2_dp2_z1", "tp2_dp2_z3"])
def test_grad_norm_equals_dense_reference(runs, name):
    """TP-replicated parameters (norms, biases) must be counted once in the global norm."""
    ref_dir, _ = runs("tp1_dp2_z1")
    run_dir, _ = runs(name)
    ref = pq.read_table(ref_dir / "metrics.parquet").column("train/grad_norm").to_pylist()
    got = pq.read_table(run_dir / "metrics.parquet").column("train/grad_norm").to_pylist()
    assert len(got) == STEPS and all(v == v for v in got)  # logged every step, never NaN
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-3, atol=0)


def test_run_directory_contents(runs):
    run_dir, _ = runs("tp2_dp2_z1")
    for name in ("config.yaml", "deepspeed_config.json", "metrics.parquet", "tb", "checkpoints/latest"):
        assert (run_dir / name).exists(), name
    table = pq.read_table(run_dir / "metrics.parquet")
    assert table.column("step").to_pylist() == list(range(1, STEPS + 1))
    for tag in ("train/task_loss", "train/total_loss", "train/lr", "train/grad_norm",
                "perf/tokens_per_sec", "perf/step_time_s", "eval/loss"):
        assert tag in table.column_names, tag
    tokens = table.column("tokens").to_pylist()
    assert tokens[0] == 4 * 2 * 32  # micro_batch * dp * seq_len per step
    eval_steps = [s for s, v in zip(table.column("step").to_pylist(), table.column("eval/loss").to_pylist()) if v is not None]
    assert eval_steps == [10, 20]
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step20"


# tp2_dp2_z1_reg is tp2_dp2_z1 plus regularizers and weight sparsity, so the plain ZeRO-1
# layout's resume is covered by it (one 4-rank relaunch less in CI).
@pytest.mark.parametrize("name", ["tp2_dp2_z3", "tp2_dp2_z1_reg"])
def test_resume_reproduces_uninterrupted_run(runs, tmp_path, name):
    """10 steps + resume + 10 steps == 20 straight steps, exactly (regularizer samples included)."""
    straight_dir, straight = runs(name)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight_dir / "checkpoints" / "global_step10", resumed_dir / "checkpoints" / "global_step10")
    (resumed_dir / "checkpoints" / "latest").write_text("global_step10")
    layout = LAYOUTS[name]
    results = launch_local(make_config(**layout), str(resumed_dir), nproc=layout["tp"] * layout["dp"], resume=True)
    resumed = results[0]
    assert sorted(resumed.losses) == list(range(11, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert resumed.losses[step] == straight.losses[step], step
    assert resumed.eval_losses[20] == straight.eval_losses[20]


@pytest.mark.parametrize("name", ["tp2_dp2_z1_reg", "tp1_dp2_z2_ws"])
def test_weight_sparsity_keeps_exactly_the_scheduled_density(runs, name):
    """Every logged weights/<matrix>/density is the schedule's kept count over the matrix's
    size, and the checkpoint's fp32 master weights (ZeRO-1 or ZeRO-2 partitions, TP shards
    merged as tti export does) hold exactly floor(density x size) nonzeros per matrix, where
    the module's own weights hold theirs (without masking the masters: 4x as many)."""
    from tti_dist.models.weight_sparsity import selected_matrices
    from tti_dist.rundir import model_states_file
    from tti_dist.train.export import consolidated_state_dict
    from tti_dist.utils.safe_load import DEEPSPEED_GLOBALS, load_torch_file

    run_dir, _ = runs(name)
    cfg = make_config(**LAYOUTS[name])
    ws = cfg.weight_sparsity
    matrices = selected_matrices(cfg.model, ws)
    assert len(matrices) == 8
    table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    for i, step in enumerate(table["step"]):
        assert table["weights/target_density"][i] == pytest.approx(ws.density_at(step, STEPS))
        for m in matrices:
            kept = m.kept(ws.density_at(step, STEPS), ws.min_per_neuron)
            assert table[f"weights/{m.name}/density"][i] == kept / m.numel, (step, m.name)
    for tag in ("global_step10", "global_step20"):
        _, master, _ = consolidated_state_dict(run_dir, tag)
        for m in matrices:
            assert int(torch.count_nonzero(master[f"{m.name}.weight"])) == int(ws.density * m.numel), (tag, m.name)
        if cfg.parallel.tp_size == 1:  # the module's weights (model states) have their zeros in the same places
            module = load_torch_file(run_dir / "checkpoints" / tag / model_states_file(0), DEEPSPEED_GLOBALS)["module"]
            for m in matrices:
                assert torch.equal(master[f"{m.name}.weight"] != 0, module[f"{m.name}.weight"] != 0), (tag, m.name)


def test_export_matches_deepspeed_zero_to_fp32(runs, tmp_path):
    """TP=1 x DP=2 ZeRO-1: tti export == DeepSpeed's own zero_to_fp32.py script."""
    from safetensors.torch import load_file

    from tti_dist.train.export import export_safetensors, load_exported

    run_dir, _ = runs("tp1_dp2_z1")
    ours = export_safetensors(run_dir, tmp_path / "ours.safetensors")
    script = run_dir / "checkpoints" / "zero_to_fp32.py"
    out_dir = tmp_path / "ds"
    subprocess.run([sys.executable, str(script), str(run_dir / "checkpoints"), str(out_dir), "--safe_serialization"],
                   check=True, capture_output=True, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    (ds_file,) = out_dir.glob("*.safetensors")
    theirs = load_file(str(ds_file))
    _, mine = load_exported(ours)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def _eval_exported(path: str, val_batches: list) -> float:
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT, lm_loss
    from tti_dist.train.export import load_exported

    groups = init_parallel(1, torch.device("cpu"), 60)
    try:
        model_cfg, state = load_exported(path)
        model = GPT(model_cfg, groups)
        model.load_state_dict(state, strict=True)
        model.eval()
        with torch.no_grad():
            losses = [lm_loss(model(b[:, :-1]), b[:, 1:]).mean() for b in val_batches]
        return torch.stack(losses).mean().item()
    finally:
        shutdown_parallel()


@pytest.mark.parametrize("name", ["tp2_dp2_z1", "tp2_dp2_z3"])
def test_tp2_export_loads_into_tp1_model(runs, tmp_path, name):
    """Merged TP shards at TP=1 reproduce the eval/loss the TP=2 job logged at step 20."""
    from tti_dist.data.loader import DistributedBatchLoader
    from tti_dist.data.prepare import run_windows
    from tti_dist.train.export import export_safetensors

    run_dir, result = runs(name)
    path = export_safetensors(run_dir, tmp_path / "model.safetensors")
    cfg = make_config(**LAYOUTS[name])
    windows = run_windows(cfg)
    per_rank = []
    for dp_rank in range(2):  # the job averaged eval/loss over its 2 DP ranks
        loader = DistributedBatchLoader(windows, "val", cfg.train.micro_batch_size, dp_rank, 2, cfg.train.seed, shuffle=False)
        per_rank.append(run_ranks(1, _eval_exported, str(path), loader.fixed_batches(cfg.train.eval_batches))[0])
    assert sum(per_rank) / 2 == pytest.approx(result.eval_losses[20], rel=1e-5)


def _save_crashes_then_resume(run_dir: str) -> dict:
    """Train 2 steps (checkpoint), then a save that fails mid-way, then resume."""
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.rundir import latest_tag
    from tti_dist.train import checkpoint as ckpt
    from tti_dist.train.trainer import Trainer

    cfg = make_config(2, 1, 1, ("train.steps=2", "optim.warmup_steps=1", "checkpoint.every=0", "train.eval_every=0"))
    groups = init_parallel(2, torch.device("cpu"), 60)
    try:
        trainer = Trainer(cfg, run_dir, groups)
        trainer.train()
        weights_before = {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}
        trainer.step = 3
        error = None
        try:
            # A lambda cannot be pickled: torch.save fails inside DeepSpeed's save, after the
            # checkpoint directory has been created.
            ckpt.save_checkpoint(trainer.engine, trainer.ckpt_dir, 3, {"step": 3, "bad": lambda: 0},
                                 groups, trainer.tp_layout, keep_last=0)
        except Exception as exc:  # noqa: BLE001 - the failure is the point
            error = type(exc).__name__
        latest_after_crash = latest_tag(trainer.ckpt_dir)
        partial_left = (trainer.ckpt_dir / "global_step3.partial").exists()
        resumed = Trainer(cfg, run_dir, groups, resume=True)
        same = all(torch.equal(v, weights_before[k]) for k, v in resumed.engine.module.named_parameters())
        resumed.step = 4
        resumed.save()  # a good save afterwards cleans up the stale partial directory
        return dict(error=error, latest=latest_after_crash, partial_left=partial_left, resumed_step=resumed.step,
                    weights_restored=same, partial_after_good_save=(trainer.ckpt_dir / "global_step3.partial").exists(),
                    latest_final=latest_tag(trainer.ckpt_dir))
    finally:
        shutdown_parallel()


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    results = run_ranks(2, _save_crashes_then_resume, str(tmp_path / "run"))
    for r in results:
        assert r["error"] is not None
        assert r["latest"] == "global_step2"
        assert r["partial_left"]
        assert r["weights_restored"]
        assert not r["partial_after_good_save"]
        assert r["latest_final"] == "global_step4"


def test_dropout_keeps_tp_replicas_identical(tmp_path):
    """With dropout, TP ranks draw the same masks for replicated activations, so the
    replicated parameters (norms, biases) stay bit-identical across TP ranks; the export's
    merge refuses replicas that differ."""
    from tti_dist.train.export import consolidated_state_dict

    cfg = make_config(2, 1, 1, ("model.dropout=0.1", "train.steps=4", "optim.warmup_steps=1", "train.eval_every=0"))
    results = launch_local(cfg, str(tmp_path / "run"), nproc=2)
    assert all(v == v for v in results[0].losses.values())
    _, state, tag = consolidated_state_dict(tmp_path / "run")
    assert tag == "global_step4" and "blocks.0.ln1.weight" in state


def test_gradient_accumulation_equals_larger_micro_batch(tmp_path):
    """micro_batch 2 x 2 accumulation steps == micro_batch 4 x 1: the loader hands out the
    same sequences per optimizer step, and DeepSpeed scales each micro-loss by 1/2."""
    common = ("train.steps=6", "optim.warmup_steps=1", "train.eval_every=0", "checkpoint.every=0",
              "checkpoint.save_final=false")
    big = launch_local(make_config(2, 1, 1, common + ("train.micro_batch_size=4",)), str(tmp_path / "big"), nproc=2)[0]
    accum = launch_local(make_config(2, 1, 1, common + ("train.micro_batch_size=2", "train.grad_accum_steps=2")),
                         str(tmp_path / "accum"), nproc=2)[0]
    steps = list(range(1, 7))
    torch.testing.assert_close(torch.tensor([accum.losses[s] for s in steps]),
                               torch.tensor([big.losses[s] for s in steps]), rtol=1e-5, atol=0)
    # A wrong accumulation (e.g. summed instead of averaged gradients) diverges after step 1.
    assert accum.losses[6] < accum.losses[1] - 0.3
