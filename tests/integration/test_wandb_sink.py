"""`logging.wandb` end to end with the real wandb package in offline mode: a tiny `tti train`,
then a resume, read back from W&B's own files and compared with RUN/metrics.parquet.

W&B's offline records are read with W&B's own reader, `wandb leet inspect RUN_DIR --json`
(one JSON object per record of the run's .wandb transaction log): every history record's
values must equal the Parquet row of the same step, tag by tag, and no step or tag may be
missing or extra. Offline mode makes no network connection.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tti_dist.metrics.wandb_sink import wandb_run_id_path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32},
    "parallel": {"tp_size": 1, "dp_size": 1},
    "optim": {"warmup_steps": 1},
    "train": {"steps": 4, "micro_batch_size": 4, "eval_every": 2, "eval_batches": 1, "device": "cpu"},
    "data": {"source": "stdlib", "max_bytes": 200_000, "seq_len": 32},
    "logging": {"progress_bar": False, "wandb": {"project": "tti-test", "mode": "offline", "tags": ["ci"]}},
    "checkpoint": {"every": 2},
}


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("WANDB_MODE", None)  # the config's mode is the one that counts
    return env


def _tti(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tti_dist.cli", *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _records(offline_run: Path) -> list[dict]:
    """W&B's records of one offline run directory, through W&B's own reader."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(offline_run), "--json"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _history(records: list[dict]) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} of the history records, without W&B's own `_` keys."""
    out: dict[int, dict[str, float]] = {}
    for r in records:
        if r["type"] == "history":
            step = int(r["history"]["step"]["num"])
            assert step not in out, f"step {step} written twice"
            out[step] = {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
    return out


def _parquet_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = {}
    for row in pq.read_table(run_dir / "metrics.parquet").to_pylist():
        step = row.pop("step")
        rows[step] = {k: v for k, v in row.items() if v is not None}
    return rows


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and math.isnan(a) else a == b


def _assert_equal(history: dict, parquet: dict, steps: list[int]) -> None:
    assert sorted(history) == steps
    for step in steps:
        assert set(history[step]) == set(parquet[step]), step
        for tag, value in parquet[step].items():
            assert _same(float(history[step][tag]), float(value)), (step, tag, history[step][tag], value)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run_dir = tmp / "tiny-run"
    _tti("train", config, "--run-dir", run_dir)
    return config, run_dir


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_every_tag_at_every_step_equals_the_parquet_table(offline_run):
    _, run_dir = offline_run
    (offline,) = _offline_runs(run_dir)
    records = _records(offline)
    parquet = _parquet_rows(run_dir)
    assert sorted(parquet) == [1, 2, 3, 4]
    assert "eval/loss" in parquet[2] and "train/task_loss" in parquet[1]
    _assert_equal(_history(records), parquet, [1, 2, 3, 4])

    (run,) = [r["run"] for r in records if r["type"] == "run"]
    run_id = wandb_run_id_path(run_dir).read_text().strip()
    assert run["run_id"] == run_id and offline.name.endswith(run_id)
    assert run["project"] == "tti-test" and run["display_name"] == run_dir.name and run["tags"] == ["ci"]
    assert "resume" not in run
    # The resolved config is the W&B run's config.
    assert run["config"]["update"]["model"]["hidden_size"] == 32
    assert run["config"]["update"]["logging"]["wandb"]["mode"] == "offline"


def test_resume_continues_the_same_wandb_run(offline_run):
    config, run_dir = offline_run
    run_id = wandb_run_id_path(run_dir).read_text().strip()
    _tti("train", config, "--run-dir", run_dir, "--resume", "--set", "train.steps=6")
    assert wandb_run_id_path(run_dir).read_text().strip() == run_id
    first, second = _offline_runs(run_dir)  # one offline directory per attempt, same id
    assert second.name.endswith(run_id)
    records = _records(second)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["run_id"] == run_id and run["resume"] is True
    parquet = _parquet_rows(run_dir)
    assert sorted(parquet) == [1, 2, 3, 4, 5, 6]
    _assert_equal(_history(records), parquet, [5, 6])


def test_a_run_that_fails_is_a_failed_wandb_run(tmp_path):
    """The trainer closes its metrics writer in a `finally`: an exception on its way up
    finishes the W&B run with exit code 1; a normal close with 0."""
    from tti_dist.config.schema import WandbConfig
    from tti_dist.metrics import MetricsWriter

    settings = WandbConfig(project="tti-test", mode="offline")
    for name, fail in (("ok", False), ("crashed", True)):
        writer = MetricsWriter(tmp_path / name, tensorboard=False, wandb=settings)
        try:
            try:
                writer.log(1, 8, {"train/task_loss": 2.5})
                if fail:
                    raise RuntimeError("a rank failed")
            finally:
                writer.close()
        except RuntimeError:
            pass
        (offline,) = _offline_runs(tmp_path / name)
        records = _records(offline)
        (exit_record,) = [r["exit"] for r in records if r["type"] == "exit"]
        assert exit_record.get("exit_code", 0) == (1 if fail else 0), exit_record
        assert _history(records) == {1: {"train/task_loss": 2.5, "tokens": 8}}
