"""The synthetic factored language is learnable by the project's own model and trainer.

A tiny GPT (2 layers, d=64, TP=1) trained for 200 steps through `tti train` on a small
generated corpus must reach a validation loss well below the corpus's unigram entropy
(the loss of the best context-free predictor), toward the process's closed-form optimum.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tti_dist.data.dataset_reader import open_dataset
from tti_dist.data.synthetic_config import FactoredConfig
from tti_dist.data.synthetic_dataset import write_synthetic_dataset
from tti_dist.data.synthetic_entropy import entropy_bounds, unigram_entropy

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_tiny_gpt_learns_well_below_unigram_entropy(tmp_path):
    synth = FactoredConfig(num_documents=3000)
    write_synthetic_dataset(synth, tmp_path / "synth")
    dataset = open_dataset(tmp_path / "synth")
    val_tokens = np.concatenate([s["tokens"] for s in dataset.split_shards("val")])
    unigram = unigram_entropy(val_tokens, dataset.vocab_size)
    optimum = entropy_bounds(synth).windowed_entropy_rate_bound(64)

    proc = subprocess.run(
        [sys.executable, "-m", "tti_dist.cli", "train", str(ROOT / "configs" / "smoke_synth.yaml"),
         "--run-dir", str(tmp_path / "run"), "--set", f"data.path={tmp_path / 'synth'}",
         "--set", "parallel.tp_size=1", "--set", "model.num_layers=2", "--set", "model.hidden_size=64",
         "--set", "data.seq_len=64", "--set", "optim.lr=1e-2", "--set", "train.steps=200",
         "--set", "train.eval_every=200", "--set", "logging.progress_bar=false",
         "--set", "checkpoint.every=0", "--set", "checkpoint.save_final=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pydict()
    (eval_loss,) = [v for v in table["eval/loss"] if v is not None]
    print(f"eval/loss {eval_loss:.3f}, unigram entropy {unigram:.3f}, optimum <= {optimum:.3f}")
    assert eval_loss < unigram - 1.0
    assert eval_loss > optimum - 0.05  # no model beats the generative process (sanity of the bound)
