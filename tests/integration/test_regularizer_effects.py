"""Each regularizer moves its target the right way in a real training run.

A tiny GPT (2 layers, d=64, TP=1, the product's trainer and DeepSpeed engine) trains on a
small synthetic factored corpus twice per regularizer: once with the regularizer at
coefficient 0 (it still computes and logs its metrics, so the baseline's value of the
target is measured by the same code) and once switched on. The target, read from the
run's metrics.parquet (mean of the last logged values), must move the right way by a wide
margin: mean |cos| of MLP input directions down with orthogonality, mean |correlation|
down with decorrelation, mean |activation| and L0 down with L1 (ReLU MLP, where units can
be exactly zero), L0 = k with the top-k MLP, total correlation down with the TC penalty.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tti_dist.config import load_config
from tti_dist.data.synthetic_config import FactoredConfig
from tti_dist.data.synthetic_dataset import write_synthetic_dataset
from tti_dist.regularizers.validation import validate_run_config
from tti_dist.train.worker import launch_local

pytestmark = pytest.mark.slow

STEPS = 60
BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.vocab_size=384",
    "model.max_seq_len=64", "parallel.tp_size=1", "parallel.dp_size=1", "zero.stage=0",
    "optim.lr=1e-2", "optim.warmup_steps=5", "optim.grad_clip=1.0",
    f"train.steps={STEPS}", "train.micro_batch_size=8", "train.eval_every=0", "train.seed=7",
    "data.seq_len=64", "logging.log_every=5", "logging.progress_bar=false", "logging.tensorboard=false",
    "checkpoint.every=0", "checkpoint.save_final=false",
]
DATASET_DIR = Path(tempfile.gettempdir()) / f"tti-test-effects-synth-{os.getpid()}"


@pytest.fixture(scope="module", autouse=True)
def _dataset():
    write_synthetic_dataset(FactoredConfig(num_documents=800), DATASET_DIR)
    yield
    shutil.rmtree(DATASET_DIR, ignore_errors=True)


def final_metrics(tmp_path: Path, label: str, regularizers: str, tags: tuple[str, ...],
                  extra: tuple[str, ...] = ()) -> list[float]:
    """Train one run; for each tag the mean of its last three logged values."""
    cfg = load_config(None, BASE + [f"data.path={DATASET_DIR}", f"regularizers={regularizers}", *extra])
    validate_run_config(cfg, world_size=1)
    run_dir = tmp_path / label
    launch_local(cfg, str(run_dir), nproc=1)
    table = pq.read_table(run_dir / "metrics.parquet").to_pydict()
    out = []
    for tag in tags:
        values = [v for v in table[tag] if v is not None]
        assert len(values) == STEPS // 5
        out.append(sum(values[-3:]) / 3)
    return out


def pair(tmp_path: Path, entry: str, coefficient: float, tags: tuple[str, ...],
         extra: tuple[str, ...] = ()) -> list[tuple[float, float]]:
    """[(baseline, regularized)] final values of each tag for a regularizer entry '{... coefficient: {c}}'."""
    off = final_metrics(tmp_path, "off", "[" + entry.format(c=0.0) + "]", tags, extra)
    on = final_metrics(tmp_path, "on", "[" + entry.format(c=coefficient) + "]", tags, extra)
    for tag, a, b in zip(tags, off, on):
        print(f"{tag}: baseline {a:.4g}, regularized {b:.4g}")
    return list(zip(off, on))


def test_orthogonality_lowers_mean_abs_cos(tmp_path):
    off, on = pair(tmp_path, "{{type: orthogonality, name: orth, coefficient: {c}, weights: ['blocks.*.mlp.fc1']}}",
                   50.0, ("reg/orth/mean_abs_cos",))[0]
    assert on < 0.7 * off


def test_decorrelation_lowers_mean_abs_correlation(tmp_path):
    off, on = pair(tmp_path, "{{type: decorrelation, name: decorr, coefficient: {c}, "
                             "hookpoints: ['blocks.1.resid_post'], normalize: true}}",
                   20.0, ("reg/decorr/mean_abs_offdiag",))[0]
    assert on < 0.7 * off


def test_l1_lowers_mean_activation_and_l0_of_a_relu_mlp(tmp_path):
    (l1_off, l1_on), (l0_off, l0_on) = pair(
        tmp_path, "{{type: l1, name: l1, coefficient: {c}, hookpoints: ['blocks.*.mlp.act']}}", 0.5,
        ("reg/l1/loss", "reg/l1/l0"), ("model.mlp_activation=relu",))
    assert l1_on < 0.5 * l1_off
    assert l0_on < 0.5 * l0_off


def test_topk_mlp_sets_l0_to_k(tmp_path):
    monitor = "[{type: l1, name: l1, coefficient: 0.0, hookpoints: ['blocks.*.mlp.act']}]"
    (dense,) = final_metrics(tmp_path, "dense", monitor, ("reg/l1/l0",))
    (sparse,) = final_metrics(tmp_path, "topk", monitor, ("reg/l1/l0",), ("model.mlp_topk=8",))
    print(f"reg/l1/l0: dense {dense:.4g}, top-8 {sparse:.4g}")
    assert dense > 250  # GELU: (almost) every one of the 256 units is nonzero
    assert sparse == 8


def test_tc_penalty_lowers_total_correlation(tmp_path):
    (off, on), = pair(tmp_path, "{{type: total_correlation, name: tc, coefficient: {c}, "
                                "hookpoints: ['blocks.0.bottleneck.z'], max_tokens: 256}}",
                      1.0, ("reg/tc/tc_mss",), ("model.bottleneck_layer=0", "model.bottleneck_dim=8"))
    assert on < 0.5 * off
