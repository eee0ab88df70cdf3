"""Faults a long run meets, injected into real `tti train` processes with real signals.

Each test starts `tti train` as a user does (a subprocess: the launcher and, for 2 ranks,
torch elastic's spawned rank processes), waits until training is under way (the first
periodic checkpoint exists), then signals the launcher or a rank by its PID:

    SIGTERM/SIGINT (preemption, Ctrl-C)  -> the step's checkpoint, exit 3, --resume continues
                                            exactly (rows equal an uninterrupted run's)
    SIGKILL of a rank (OOM killer)        -> exit 1, last line names the rank and the signal,
                                            the last checkpoint resumes
    SIGSTOP of a rank (a hung peer)       -> exit 1 within train.dist_timeout_s + torch's
                                            teardown, the line names the timeout
    non-finite loss (lr = 1e30)           -> stop: exit 1 naming step and tag, no poisoned
                                            checkpoint; skip: weights and optimizer unchanged
    a file-size limit (RLIMIT_FSIZE)      -> exit 1 naming the path, previous checkpoint kept
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch

from tti_dist.data.build import build_dataset

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS = 120
FIRST_CHECKPOINT = 10


@pytest.fixture(scope="module")
def dataset():
    path = Path(tempfile.mkdtemp(prefix="tti-faults-data-"))
    build_dataset("stdlib", path, tokenizer="byte", val_fraction=0.05, max_bytes=400_000, overwrite=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def overrides(dataset: Path, *extra: str) -> list[str]:
    sets = [
        "logging.progress_bar=false", "model.num_layers=2", "model.hidden_size=64", "optim.warmup_steps=2",
        f"train.steps={STEPS}", "train.eval_every=0", f"checkpoint.every={FIRST_CHECKPOINT}", "checkpoint.keep_last=0",
        f"data.path={dataset}", *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def start(run_dir: Path, sets: list[str], resume: bool = False, preexec_fn=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tti_dist.cli", "train", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run_dir),
           *sets] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def run(run_dir: Path, sets: list[str], resume: bool = False, preexec_fn=None) -> tuple[int, str]:
    return finish(start(run_dir, sets, resume=resume, preexec_fn=preexec_fn))


def wait_for_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 180) -> None:
    """Until the first periodic checkpoint exists (the ranks are past setup and training)."""
    marker = run_dir / "checkpoints" / f"global_step{FIRST_CHECKPOINT}"
    deadline = time.monotonic() + timeout
    while not marker.is_dir():
        assert proc.poll() is None, f"tti train exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "training did not reach the first checkpoint"
        time.sleep(0.02)


def rank_pids(launcher_pid: int) -> list[int]:
    """The rank processes torch elastic spawned, in local-rank order (spawn order)."""
    children = psutil.Process(launcher_pid).children()
    ranks = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    return [c.pid for c in sorted(ranks, key=lambda c: c.create_time())]


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def losses(run_dir: Path) -> dict[int, float]:
    table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    return dict(zip(table["step"], table["train/task_loss"]))


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    """The reference: the same config, trained straight through."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    code, err = run(run_dir, overrides(dataset))
    assert code == 0, err[-3000:]
    return losses(run_dir)


def test_sigterm_to_launcher_saves_that_step_and_resume_equals_uninterrupted(dataset, uninterrupted, tmp_path):
    """Kubernetes' SIGTERM to the container's main process, then a second one during the save."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, overrides(dataset))
    wait_for_training(proc, run_dir)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)  # impatient: must not corrupt the save in progress
    code, err = finish(proc)
    assert code == 3, err[-3000:]
    tag = latest(run_dir)
    stopped_at = int(tag.removeprefix("global_step"))
    assert FIRST_CHECKPOINT < stopped_at < STEPS
    assert last_line(err).startswith(f"tti: stopped by SIGTERM. The latest complete checkpoint is {run_dir}/checkpoints/{tag}")
    assert sorted(losses(run_dir)) == list(range(1, stopped_at + 1))
    assert not list((run_dir / "checkpoints").glob("*.partial"))

    code, err = run(run_dir, overrides(dataset), resume=True)
    assert code == 0, err[-3000:]
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == uninterrupted  # every row, bit for bit


def test_sigint_to_the_ranks_alone_stops_after_a_checkpoint(dataset, tmp_path):
    """Ctrl-C or a scheduler that signals every task: the ranks get the signal themselves."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, overrides(dataset))
    wait_for_training(proc, run_dir)
    pids = rank_pids(proc.pid)
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGINT)
    code, err = finish(proc)
    assert code == 3, err[-3000:]
    assert last_line(err).startswith("tti: stopped by a signal to the ranks. The latest complete checkpoint is")
    stopped_at = int(latest(run_dir).removeprefix("global_step"))
    assert stopped_at > FIRST_CHECKPOINT
    assert max(losses(run_dir)) == stopped_at


def test_sigterm_during_setup_of_a_single_process_run(dataset, tmp_path):
    """The signal arrives while the rank builds its engine and data (RUN/config.yaml is
    written there): the run still trains its first step, saves it and stops."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, overrides(dataset, "parallel.tp_size=1"))
    deadline = time.monotonic() + 180
    while not (run_dir / "config.yaml").is_file():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    code, err = finish(proc)
    assert code == 3, err[-3000:]
    stopped_at = int(latest(run_dir).removeprefix("global_step"))
    assert last_line(err).startswith(f"tti: stopped by SIGTERM after step {stopped_at}.")
    assert max(losses(run_dir)) == stopped_at


def test_on_signal_false_leaves_the_last_periodic_checkpoint(dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, overrides(dataset, "checkpoint.on_signal=false", "checkpoint.every=100", "train.steps=2000"))
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "global_step100").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    code, err = finish(proc)
    assert code == 1, err[-3000:]
    assert latest(run_dir) == "global_step100"


def test_killed_rank_is_named_and_the_last_checkpoint_resumes(dataset, tmp_path):
    """The OOM killer's SIGKILL to one rank."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, overrides(dataset))
    wait_for_training(proc, run_dir)
    victim = rank_pids(proc.pid)[1]
    os.kill(victim, signal.SIGKILL)
    code, err = finish(proc)
    assert code == 1
    line = last_line(err)
    assert line.startswith(f"tti: training failed: rank 1 (pid {victim}) was killed by SIGKILL"), line
    assert "tti_dist/cli.py" not in err  # no traceback from tti's own launcher
    tag = latest(run_dir)
    assert f"The latest complete checkpoint is {run_dir}/checkpoints/{tag}" in line

    code, err = run(run_dir, overrides(dataset), resume=True)
    assert code == 0, err[-3000:]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_stopped_rank_fails_the_run_within_the_collective_timeout(dataset, tmp_path):
    """SIGSTOP: a peer that neither answers nor dies. megatron-core's TP group must get
    train.dist_timeout_s too (its own default is 30 minutes)."""
    timeout_s = 5
    run_dir = tmp_path / "run"
    proc = start(run_dir, overrides(dataset, f"train.dist_timeout_s={timeout_s}", "checkpoint.signal_grace_s=5"))
    wait_for_training(proc, run_dir)
    victim = rank_pids(proc.pid)[1]
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        code, err = finish(proc, timeout=180)
    finally:
        if psutil.pid_exists(victim):
            os.kill(victim, signal.SIGKILL)
    elapsed = time.monotonic() - stopped
    assert code == 1
    # The timeout, then torch's teardown of the process that does not exit (SIGTERM, 30 s, SIGKILL).
    assert elapsed < timeout_s + 30 + 20, elapsed
    line = last_line(err)
    assert line.startswith("tti: training failed: rank 0"), line
    assert f"a collective did not complete within train.dist_timeout_s = {timeout_s} s" in line


# -- non-finite steps ---------------------------------------------------------------------

EXPLODE = ("optim.lr=1e30", "optim.warmup_steps=1", "train.steps=6", "checkpoint.every=1")
"""The first update multiplies every weight by ~1e30: the second step's loss is NaN."""


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every DeepSpeed file of a checkpoint, keyed by file and path."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if torch.is_tensor(value):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for f in sorted(ckpt.glob("*.pt")):
        walk(f.name, torch.load(f, map_location="cpu", weights_only=False))
    return out


def test_nonfinite_stop_names_step_and_tag_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    run_dir = tmp_path / "run"
    code, err = run(run_dir, overrides(dataset, *EXPLODE))
    assert code == 1, err[-3000:]
    assert last_line(err).startswith("tti: train/task_loss is nan at step 2; no update was applied and the run stopped "
                                     "(train.nonfinite: stop). The latest complete checkpoint is"), last_line(err)
    assert latest(run_dir) == "global_step1"
    assert not (run_dir / "checkpoints" / "global_step2").exists()
    assert sorted(losses(run_dir)) == [1]


@pytest.mark.parametrize("layout", [("parallel.tp_size=2",), ("parallel.tp_size=1", "parallel.dp_size=2")],
                         ids=["tp2_stage0", "dp2_zero1"])
def test_nonfinite_skip_leaves_weights_optimizer_and_lr_unchanged(dataset, tmp_path, layout):
    """stage 0 (TP=2 at DP=1) skips in tti's step; ZeRO-1 at DP=2 in DeepSpeed's optimizer."""
    run_dir = tmp_path / "run"
    code, err = run(run_dir, overrides(dataset, *EXPLODE, "train.nonfinite=skip", *layout))
    assert code == 0, err[-3000:]
    table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    assert table["step"] == [1, 2, 3, 4, 5, 6]
    assert table["train/skipped_steps"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert len(set(table["train/lr"][1:])) == 1  # the schedule held
    before = checkpoint_tensors(run_dir / "checkpoints" / "global_step1")
    after = checkpoint_tensors(run_dir / "checkpoints" / "global_step6")
    assert before.keys() == after.keys() and len(before) > 10
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


# -- write failures -----------------------------------------------------------------------

def file_size_limit(limit_bytes: int):
    """preexec_fn: files over `limit_bytes` cannot be written (EFBIG; SIGXFSZ ignored so the
    write fails instead of killing the process), as on a full or quota-bound disk."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_checkpoint_write_failure_names_the_path_and_keeps_the_previous_checkpoint(dataset, tmp_path):
    run_dir = tmp_path / "run"
    code, err = run(run_dir, overrides(dataset, "train.steps=10"))
    assert code == 0, err[-3000:]
    # Each rank's model states file is ~0.9 MB: none of step 20's can be written.
    code, err = run(run_dir, overrides(dataset, "train.steps=20"), resume=True, preexec_fn=file_size_limit(300_000))
    assert code == 1
    line = last_line(err)
    assert f"{run_dir}/checkpoints/global_step20.partial: could not write the checkpoint of step 20" in line, line
    assert "the latest complete checkpoint is still global_step10" in line
    assert latest(run_dir) == "global_step10"
    assert not (run_dir / "checkpoints" / "global_step20").exists()  # no complete-looking checkpoint of step 20

    code, err = run(run_dir, overrides(dataset, "train.steps=20"), resume=True)
    assert code == 0, err[-3000:]
    assert latest(run_dir) == "global_step20"
    assert sorted(losses(run_dir)) == list(range(1, 21))
