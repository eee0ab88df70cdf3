"""A regularizer from outside the package (tests/plugins/tti_plugin_example.py, `weight_lp`),
registered through the config's `imports:` and trained with `tti train --nproc 2` at TP=2
(gloo): its loss term is in the metrics with the value its formula gives on the weights.

The plugin is named by a .py path relative to the config file, and its directory is not on
the ranks' PYTHONPATH: the spawned ranks import it through the pickled config.

Check: the loss logged at step 3 was computed on the weights before the third update, which
are the weights of the checkpoint saved after step 2; the test recomputes
L = (1/K) sum_k mean |W_k|^p from both TP ranks' shards of that checkpoint. The total loss
is the task loss plus coefficient x L at every step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tti_dist.utils.safe_load import DEEPSPEED_GLOBALS, load_torch_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugins" / "tti_plugin_example.py"
LAYERS = ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.0.attn.proj"]  # column- and row-parallel
P = 1.5
COEFFICIENT = 0.5


def test_plugin_regularizer_trains_at_tp2_with_the_formula_value(tmp_path):
    config = tmp_path / "plugin.yaml"
    config.write_text(yaml.safe_dump({
        "imports": [os.path.relpath(PLUGIN, tmp_path)],
        "model": {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_seq_len": 32},
        "parallel": {"tp_size": 2, "dp_size": 1},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 3, "micro_batch_size": 4, "eval_every": 0, "device": "cpu"},
        "data": {"source": "stdlib", "max_bytes": 200_000, "seq_len": 32},
        "logging": {"progress_bar": False, "tensorboard": False},
        "checkpoint": {"every": 2},
        "regularizers": [{"type": "weight_lp", "name": "wlp", "coefficient": COEFFICIENT,
                          "layers": ["blocks.*.mlp.fc1", "blocks.0.attn.proj"], "p": P}],
    }))
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and Path(p).resolve() != PLUGIN.parent)
    proc = subprocess.run([sys.executable, "-m", "tti_dist.cli", "train", str(config), "--run-dir", str(run_dir),
                           "--nproc", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["imports"] == [str(PLUGIN)]

    metrics = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    assert metrics["step"] == [1, 2, 3]
    assert metrics["reg/wlp/coefficient"] == [COEFFICIENT] * 3
    losses = metrics["reg/wlp/loss"]
    # Recompute L at step 3 from the checkpoint after step 2, both TP shards of each layer.
    shards = [load_torch_file(run_dir / "checkpoints" / "global_step2" / f"mp_rank_0{r}_model_states.pt",
                              DEEPSPEED_GLOBALS)["module"] for r in (0, 1)]
    per_layer = []
    for name in LAYERS:
        weights = [s[f"{name}.weight"].double() for s in shards]
        assert weights[0].shape == weights[1].shape  # split over the 2 TP ranks
        total = sum(w.abs().pow(P).sum() for w in weights)
        per_layer.append(total / sum(w.numel() for w in weights))
    expected = float(torch.stack(per_layer).mean())
    assert losses[2] == pytest.approx(expected, rel=1e-5)
    assert losses[0] != pytest.approx(losses[2], rel=1e-6)  # the weights moved: a value of step 3's weights
    # The weighted term is part of the objective the model trained on.
    for task, total, reg in zip(metrics["train/task_loss"], metrics["train/total_loss"], losses):
        assert total - task == pytest.approx(COEFFICIENT * reg, abs=2e-6)
        assert COEFFICIENT * reg > 5e-4  # far above the tolerance: the term is really there
