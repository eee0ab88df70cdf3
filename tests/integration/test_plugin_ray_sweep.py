"""A one-trial sweep on the embedded local Ray (loopback only) whose base config imports a
regularizer plugin and logs to W&B offline: the plugin reaches the Ray processes (the trial
driver and the Ray Train worker unpickle the config, which imports it by path first), its
loss term is in the trial's metrics, and the trial is a W&B run of its own, named after its
run directory and grouped by the sweep's name.

One Ray session for both features: Ray's start-up is most of this test's time.
"""

from __future__ import annotations

import json
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
PLUGIN = ROOT / "tests" / "plugins" / "tti_plugin_example.py"


def test_sweep_trial_with_a_plugin_and_wandb_offline(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "imports": [os.path.relpath(PLUGIN, tmp_path)],  # relative to the base config
        "model": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 2, "micro_batch_size": 4, "eval_every": 0, "device": "cpu"},
        "data": {"source": "stdlib", "max_bytes": 100_000, "seq_len": 32},
        "logging": {"progress_bar": False, "tensorboard": False,
                    "wandb": {"project": "tti-test", "mode": "offline"}},
        "checkpoint": {"every": 0},
        "regularizers": [{"type": "weight_lp", "name": "wlp", "coefficient": 0.5, "layers": ["blocks.*.mlp.fc1"]}],
    }))
    sweep = tmp_path / "plugged.yaml"
    sweep.write_text(yaml.safe_dump({"name": "plugged", "base": "base.yaml", "axes": {"seed": [7]}, "eval": False}))
    out = tmp_path / "out"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and Path(p).resolve() != PLUGIN.parent)
    proc = subprocess.run([sys.executable, "-m", "tti_dist.cli", "sweep", str(sweep), "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1/1 trials completed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]

    (run,) = [p for p in (out / "runs").iterdir() if p.is_dir()]
    record = json.loads((run / "trial.json").read_text())
    assert record["status"] == "completed" and record["coefficients"] == {"wlp": 0.5}, record
    metrics = pq.read_table(run / "metrics.parquet").to_pydict()
    assert metrics["step"] == [1, 2]
    for task, total, reg in zip(metrics["train/task_loss"], metrics["train/total_loss"], metrics["reg/wlp/loss"]):
        assert reg > 1e-4 and total - task == pytest.approx(0.5 * reg, abs=2e-6)

    # One W&B offline directory per attempt of the worker group: this trial ran once.
    assert record["restarts"] == 0, proc.stdout[-3000:]
    (offline,) = sorted((run / "wandb").glob("offline-run-*"))
    records = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(offline), "--json"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert records.returncode == 0, records.stderr[-2000:]
    rows = [json.loads(line) for line in records.stdout.splitlines() if line.strip()]
    (wandb_run,) = [r["run"] for r in rows if r["type"] == "run"]
    assert wandb_run["run_id"] == wandb_run_id_path(run).read_text().strip()
    assert wandb_run["run_group"] == "plugged" and wandb_run["display_name"] == run.name == "t000-seed7"
    history = {int(r["history"]["step"]["num"]): r["history"]["item"] for r in rows if r["type"] == "history"}
    assert [history[s]["reg/wlp/loss"] for s in (1, 2)] == metrics["reg/wlp/loss"]
