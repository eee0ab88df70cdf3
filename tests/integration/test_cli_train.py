"""`tti train configs/smoke.yaml` end to end, as a user runs it (subprocess, 2 local ranks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tti_dist.cli", "train", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run_dir),
         "--set", "logging.progress_bar=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc


def test_writes_run_directory(smoke_run):
    run_dir, _ = smoke_run
    for name in ("config.yaml", "deepspeed_config.json", "metrics.parquet", "tb", "checkpoints/latest",
                 "checkpoints/global_step50", "checkpoints/global_step25"):
        assert (run_dir / name).exists(), name


def test_loss_falls(smoke_run):
    run_dir, proc = smoke_run
    table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    assert table["step"] == list(range(1, 51))
    losses = table["train/task_loss"]
    # Byte-level text starts near ln(384) = 5.95 nats; 50 steps must get well below it.
    assert losses[0] > 5.0 and sum(losses[-5:]) / 5 < losses[0] - 2.0
    evals = [v for v in table["eval/loss"] if v is not None]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert "trained to step 50" in proc.stdout


def test_tensorboard_has_the_same_scalars(smoke_run):
    run_dir, _ = smoke_run
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    events = acc.Scalars("train/task_loss")
    assert [e.step for e in events] == table["step"]
    assert [e.value for e in events] == pytest.approx(table["train/task_loss"], rel=1e-6)
    for tag in ("train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/step_time_s", "eval/loss"):
        assert tag in acc.Tags()["scalars"], tag


def test_export_cli(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    out = tmp_path / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "tti_dist.cli", "export", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out.is_file() and out.stat().st_size > 1_000_000  # ~1M fp32 parameters


def test_rerun_into_same_directory_refused(smoke_run):
    run_dir, _ = smoke_run
    proc = subprocess.run(
        [sys.executable, "-m", "tti_dist.cli", "train", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"tti: error: --run-dir: '{run_dir}' already holds checkpoints; pass --resume to continue it or choose another directory"
    ]


def test_resume_cli_continues_run(smoke_run, tmp_path):
    """`--resume` continues from the latest checkpoint; metrics continue without duplicates."""
    import shutil

    src, _ = smoke_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "tti_dist.cli", "train", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run_dir),
         "--resume", "--set", "train.steps=55", "--set", "logging.progress_bar=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    assert table["step"] == list(range(1, 56))
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step55"
    assert "trained to step 55" in proc.stdout


def test_resume_with_other_model_refused(smoke_run):
    run_dir, _ = smoke_run
    proc = subprocess.run(
        [sys.executable, "-m", "tti_dist.cli", "train", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run_dir),
         "--resume", "--set", "model.hidden_size=64"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tti: error: model.hidden_size: 64 differs from the checkpointed run's 128; resume needs the same value"
    ]


def test_single_process_run(tmp_path):
    """--nproc 1 (TP=1, DP=1) runs in-process without the elastic agent."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tti_dist.cli", "train", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run_dir),
         "--set", "parallel.tp_size=1", "--set", "train.steps=4", "--set", "optim.warmup_steps=1",
         "--set", "train.eval_every=0", "--set", "checkpoint.every=0", "--set", "logging.progress_bar=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trained to step 4" in proc.stdout
    assert pq.read_table(run_dir / "metrics.parquet").column("step").to_pylist() == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt").is_file()
