"""SIGTERM to a worker of a Ray trial (real Ray, embedded, loopback only).

The trial's 2 workers (dp_size 2) install the stop handler on their actors' main threads
(orchestrate/ray_backend.py); one worker is sent SIGTERM mid-run. Both ranks finish that
optimizer step and save it (the only checkpoint before the end: checkpoint.every=0), fail
the attempt, and Ray Train restarts the group, which resumes from exactly that checkpoint;
every logged loss equals an uninterrupted `tti train` of the same config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "scaling_base.yaml"
STEPS, LOG_EVERY = 32, 4
# Evaluating at every logged step makes every logged step a report to Ray Train (trials
# report eval and checkpoint steps only), which the test counts to signal mid-run.
SETTINGS = ["parallel.dp_size=2", f"train.steps={STEPS}", "optim.warmup_steps=2", f"train.eval_every={LOG_EVERY}",
            f"logging.log_every={LOG_EVERY}", "checkpoint.every=0", "checkpoint.keep_last=0",
            "train.micro_batch_size=4", "data.seq_len=32", "model.max_seq_len=32"]


def _env(**extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _reports(ray_tmp: Path, pid: int) -> int:
    """How many results the worker with this pid has reported to Ray Train (its Ray log)."""
    logs = list((ray_tmp / "ray" / "session_latest" / "logs").glob(f"worker-*-{pid}.err"))
    return sum(log.read_text(errors="replace").count("Reporting training result") for log in logs)


def test_sigterm_to_a_ray_worker_checkpoints_that_step_and_the_restart_resumes_from_it(tmp_path):
    sweep = tmp_path / "preempt.yaml"
    sweep.write_text(yaml.safe_dump({"name": "preempt", "base": str(BASE), "set": SETTINGS,
                                     "axes": {"model_size": ["xs"]}, "max_failures": 1, "eval": False,
                                     "resources": {"cpus_per_worker": 1}}))
    out = tmp_path / "out"
    run = out / "runs" / "t000-xs"
    workers = run / "workers.jsonl"
    # The embedded Ray's own temp dir (short: it holds unix sockets), to read its worker logs.
    ray_tmp = Path(tempfile.mkdtemp(prefix="tti-ray-", dir="/tmp"))
    # Ray Train's controller takes one report per worker per poll; poll every 0.5 s, not 2 s.
    driver = subprocess.Popen([sys.executable, "-m", "tti_dist.cli", "sweep", str(sweep), "--out", str(out)],
                              cwd=ROOT, env=_env(RAY_TMPDIR=str(ray_tmp), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reference_proc = None
    reference, reference_log = tmp_path / "reference", tmp_path / "reference.log"
    try:
        # Mid-run: rank 1 has reported its second logged step. A worker's report waits until
        # the controller has taken its previous one, so the run is far from its end when the
        # signal arrives. The uninterrupted reference (`tti train` of the trial's resolved
        # config) runs while Ray restarts the trial.
        deadline = time.monotonic() + 300
        signalled, mid_run = None, False
        while driver.poll() is None and time.monotonic() < deadline:
            text = workers.read_text() if workers.is_file() else ""
            starts = [json.loads(line) for line in text.splitlines()[:text.count("\n")]]  # whole lines
            # Rank 1: rank 0 learns of the signal from the step's all-reduce.
            signalled = next((w for w in starts if w["rank"] == 1), None)
            mid_run = signalled is not None and _reports(ray_tmp, signalled["pid"]) >= 2
            if mid_run:
                break
            time.sleep(0.05)
        if not mid_run or driver.poll() is not None:
            driver.kill()
            raise AssertionError(f"the trial never reached rank 1's second report:\n{driver.communicate()[0][-4000:]}")
        os.kill(signalled["pid"], signal.SIGTERM)
        with reference_log.open("w") as log:  # the trial's config.yaml: written by rank 0 before training
            reference_proc = subprocess.Popen(
                [sys.executable, "-m", "tti_dist.cli", "train", str(run / "config.yaml"), "--run-dir", str(reference)],
                cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        output, _ = driver.communicate(timeout=400)
        reference_proc.wait(timeout=300)
    finally:
        for proc in (driver, reference_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert driver.returncode == 0, output[-4000:]
    assert "1/1 trials completed" in output

    from tti_dist.rundir import complete_tags, tag_step

    # The only checkpoints: the signalled step's and the final one.
    tags = complete_tags(run / "checkpoints")
    assert len(tags) == 2 and tag_step(tags[1]) == STEPS, tags
    stopped_at = tag_step(tags[0])
    assert 2 * LOG_EVERY < stopped_at < STEPS

    record = json.loads((run / "trial.json").read_text())
    assert record["status"] == "completed" and record["restarts"] == 1 and record["steps"] == STEPS
    starts = [json.loads(line) for line in (run / "workers.jsonl").read_text().splitlines()]
    assert len(starts) == 4
    assert [s["resumed_from"] for s in starts[:2]] == [None, None]
    assert sorted(s["rank"] for s in starts[2:]) == [0, 1]
    assert {s["resumed_from"] for s in starts[2:]} == {tags[0]}  # that step, not step 0
    assert {s["resumed_via"] for s in starts[2:]} == {"ray"}  # Ray registered the signal's checkpoint
    assert signalled["pid"] not in {s["pid"] for s in starts[2:]}  # fresh worker actors

    assert reference_proc.returncode == 0, reference_log.read_text()[-4000:]
    got = pq.read_table(run / "metrics.parquet").to_pydict()
    want = pq.read_table(reference / "metrics.parquet").to_pydict()
    assert got["step"] == want["step"] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert got["train/task_loss"] == want["train/task_loss"]  # bit for bit


def test_nonfinite_stop_fails_the_trial_with_step_and_tag(tmp_path):
    """train.nonfinite: stop under Ray: the trial is recorded as failed, naming the step and
    the first non-finite tag, and no checkpoint after the last good step exists."""
    sweep = tmp_path / "nan.yaml"
    settings = ["train.steps=4", "optim.lr=1e30", "optim.warmup_steps=1", "train.eval_every=0", "logging.log_every=1",
                "checkpoint.every=1", "checkpoint.keep_last=0", "train.micro_batch_size=4", "data.seq_len=32",
                "model.max_seq_len=32"]
    sweep.write_text(yaml.safe_dump({"name": "nan", "base": str(BASE), "set": settings, "axes": {"model_size": ["xs"]},
                                     "max_failures": 0, "eval": False, "resources": {"cpus_per_worker": 1}}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tti_dist.cli", "sweep", str(sweep), "--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "runs" / "t000-xs" / "trial.json").read_text())
    assert record["status"] == "failed"
    assert "train/task_loss is nan at step 2; no update was applied (train.nonfinite: stop)" in record["error"]
    ckpts = out / "runs" / "t000-xs" / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step1" and not (ckpts / "global_step2").exists()
