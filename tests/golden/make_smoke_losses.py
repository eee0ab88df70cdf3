"""Regenerate tests/golden/smoke_tp1_losses.json (only when a numerics change is intended).

    .venv/bin/python tests/golden/make_smoke_losses.py

Trains configs/smoke.yaml at TP=1 for 20 steps through the real CLI and records the
per-step train/task_loss, the learning rate and the dataset's manifest hash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("smoke_tp1_losses.json")
OVERRIDES = ("parallel.tp_size=1", "train.steps=20", "train.eval_every=0", "checkpoint.every=0",
             "checkpoint.save_final=false", "logging.tensorboard=false", "logging.progress_bar=false")
INTRA_OP_THREADS = "2"
"""The record was made with 2 intra-op threads (one rank on a 2-core machine). The thread
count changes the summation order of the matmuls (losses move by ~1e-3 within 20 steps), so
the run pins it through OMP_NUM_THREADS, whatever the machine's cores or the caller's setting."""


def dataset_fingerprint(manifest: dict) -> dict[str, list[str]]:
    """The sha256 of every shard of each split: the golden losses hold for these tokens only
    (the stdlib source is the interpreter's own files)."""
    return {split: [shard["sha256"] for shard in info["shards"]] for split, info in manifest["splits"].items()}


def train_smoke(run_dir: Path) -> dict:
    """Run the smoke config with OVERRIDES into run_dir; return the golden record."""
    cmd = [sys.executable, "-m", "tti_dist.cli", "train", str(ROOT / "configs" / "smoke.yaml"),
           "--run-dir", str(run_dir)]
    for override in OVERRIDES:
        cmd += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": INTRA_OP_THREADS}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    manifest = json.loads((run_dir / "dataset" / "manifest.json").read_text())
    return {
        "config": "configs/smoke.yaml",
        "overrides": list(OVERRIDES),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "dataset_shards_sha256": dataset_fingerprint(manifest),
        "step": table["step"],
        "train/task_loss": table["train/task_loss"],
        "train/lr": table["train/lr"],
    }


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        record = train_smoke(Path(tmp) / "run")
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
