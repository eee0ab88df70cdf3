"""`tti eval` and `tti inspect` on a real TP=2 run of the synthetic corpus (gloo ranks).

One tiny run (TP=2, ZeRO-1, 6 steps, ReLU MLP) is trained once per module. Its evaluation
at TP=2 (2 ranks, from the sharded checkpoint) must equal the evaluation of its TP=1
export (`--weights`, 1 rank); the outputs (Parquet, TensorBoard, summary) must carry the
documented tags, every interp/* value finite (the MLP pre-activations, 128 units in a
32-dimensional subspace, have an infinite plug-in Gaussian TC); `tti inspect` must report
exactly the largest activations of the unit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tti_dist.config import load_config
from tti_dist.data.synthetic_config import FactoredConfig
from tti_dist.data.synthetic_dataset import write_synthetic_dataset
from tti_dist.regularizers.validation import validate_run_config
from tti_dist.train.worker import launch_local

pytestmark = pytest.mark.slow

DATASET_DIR = Path(os.environ.setdefault(
    "TTI_TEST_EVAL_DATASET_DIR", str(Path(tempfile.gettempdir()) / f"tti-test-eval-synth-{os.getpid()}")))
STEPS = 6
FACTORS = ("topic", "role", "number", "negation", "attribute")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    write_synthetic_dataset(FactoredConfig(num_documents=400), DATASET_DIR, overwrite=True)
    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.max_seq_len=32",
        "model.vocab_size=320", "model.mlp_activation=relu", "parallel.tp_size=2", "zero.stage=1",
        "optim.warmup_steps=1", f"train.steps={STEPS}", "train.micro_batch_size=8", f"train.eval_every={STEPS}",
        "train.eval_batches=4",
        "data.seq_len=32", f"data.path={DATASET_DIR}", "logging.progress_bar=false", "checkpoint.every=0",
        "regularizers=[{type: sae, name: sae, coefficient: 0.1, hookpoints: ['blocks.1.resid_post'], "
        "num_latents: 64, k: 4, aux_k: 8}]",
    ])
    validate_run_config(cfg, world_size=2)
    run = tmp_path_factory.mktemp("eval") / "run"
    launch_local(cfg, str(run), nproc=2)
    yield run
    shutil.rmtree(DATASET_DIR, ignore_errors=True)


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tti_dist.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


@pytest.fixture(scope="module")
def evaluated(run_dir):
    """tti eval at TP=2, then the TP=1 export evaluated with --weights: both scalar tables."""
    proc = _cli("eval", str(run_dir), "--batches", "4", "--max-tokens", "1024")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp2 = pq.read_table(run_dir / "eval" / f"{STEPS}.parquet").to_pylist()[0]
    model = run_dir / "model.safetensors"
    assert _cli("export", str(run_dir), "--out", str(model)).returncode == 0
    proc1 = _cli("eval", str(run_dir), "--weights", str(model), "--batches", "4", "--max-tokens", "1024")
    assert proc1.returncode == 0, proc1.stderr[-3000:]
    tp1 = pq.read_table(run_dir / "eval" / "model.parquet").to_pylist()[0]
    return tp2, tp1, proc.stdout


def test_eval_tp2_checkpoint_equals_tp1_export(evaluated):
    tp2, tp1, _ = evaluated
    # An export holds no SAE: only the co-trained SAE's splice metrics are missing at TP=1.
    assert {k for k in tp2 if not k.startswith("sae/")} == set(tp1)
    for tag, value in tp2.items():
        if tag in ("step", "tokens") or tag.startswith("sae/"):
            continue
        if "/probe" in tag or "/mig" in tag or "/mono" in tag:
            # Fitted on activations equal to ~1e-6: discrete outcomes (bins, argmax) may flip
            # for a handful of the 1024 tokens.
            assert value == pytest.approx(tp1[tag], abs=0.02), tag
        else:
            # Includes gaussian_tc_per_unit_bc: its 1% noise floor keeps the correlation matrix
            # well conditioned (the old plug-in, -1/2 log det of a nearly singular matrix,
            # needed rel=2e-3 here; measured now: <= 3e-7).
            assert value == pytest.approx(tp1[tag], rel=1e-4, abs=1e-6), tag


def test_eval_loss_reproduces_the_logged_one(evaluated, run_dir):
    # --batches 4 = train.eval_batches x dp_size: the windows the trainer's eval read.
    tp2, _, _ = evaluated
    logged = pq.read_table(run_dir / "metrics.parquet").to_pandas().dropna(subset=["eval/loss"])
    assert list(logged["step"]) == [STEPS]
    assert tp2["eval/loss"] == pytest.approx(float(logged["eval/loss"].iloc[0]), rel=1e-5)
    # The co-trained SAE, restored from the checkpoint: the splice metrics logged at that step.
    for tag in ("ev", "ce_loss_recovered", "l0", "dead_fraction"):
        name = f"sae/blocks.1.resid_post/{tag}"
        assert tp2[name] == pytest.approx(float(logged[name].iloc[0]), rel=1e-4, abs=1e-6), name
    # Its latents (gathered over TP) scored against the corpus's factors: MCC and F1 per factor.
    prefix = "sae/blocks.1.resid_post/"
    assert tp2[prefix + "gt_num_features"] > len(FACTORS)
    assert 0 < tp2[prefix + "gt_mcc"] < 1 and 0 < tp2[prefix + "gt_f1_mean"] <= 1
    assert {f for f in FACTORS if f"{prefix}gt_f1_mean_{f}" in tp2} == set(FACTORS)


def test_eval_reports_the_documented_tags(evaluated, run_dir):
    tp2, _, stdout = evaluated
    assert tp2["step"] == STEPS
    assert tp2["eval/ppl"] == pytest.approx(math.exp(tp2["eval/loss"]))
    # Every interpretability value is finite, at TP=2 and on the TP=1 export.
    for table in evaluated[:2]:
        bad = {k: v for k, v in table.items() if k.startswith("interp/") and not math.isfinite(v)}
        assert not bad, bad
    tc_cap = 0.5 * math.log(101)  # a null direction under the 1% noise floor
    for i in range(2):
        for tag in ("l0", "l0_frac", "dead_frac", "dense_1pct_frac", "dense_10pct_frac", "gaussian_tc_per_unit_bc",
                    "gaussian_tc_num_units"):
            assert f"interp/blocks.{i}.mlp.act/{tag}" in tp2
            assert f"interp/blocks.{i}.resid_post/{tag}" in tp2
        assert f"interp/blocks.{i}.mlp.act/gaussian_tc" not in tp2  # the uncorrected plug-in is not reported
        assert 0 <= tp2[f"interp/blocks.{i}.mlp.act/l0"] <= 128  # ReLU: exact zeros
        assert tp2[f"interp/blocks.{i}.mlp.act/l0_frac"] == pytest.approx(tp2[f"interp/blocks.{i}.mlp.act/l0"] / 128)
        for site in ("mlp.pre", "mlp.act", "resid_post"):
            assert -0.05 < tp2[f"interp/blocks.{i}.{site}/gaussian_tc_per_unit_bc"] < tc_cap, site
        # 1024 tokens > 128 units: all live units are used.
        live = 128 * (1 - tp2[f"interp/blocks.{i}.mlp.pre/dead_frac"])
        assert tp2[f"interp/blocks.{i}.mlp.pre/gaussian_tc_num_units"] == live
        for which in ("fc1", "fc2"):
            assert 0 <= tp2[f"interp/blocks.{i}.mlp.{which}/mean_abs_cos"] <= tp2[f"interp/blocks.{i}.mlp.{which}/max_abs_cos"] <= 1
            assert 0 <= tp2[f"interp/blocks.{i}.mlp.{which}/mean_sq_cos_rel"] <= 32  # <= d (all rows parallel)
        for f in FACTORS:
            acc, chance = tp2[f"interp/blocks.{i}.resid_post/probe_{f}"], tp2[f"interp/blocks.{i}.resid_post/probe_{f}_chance"]
            assert 0 <= chance <= 1 and 0 <= acc <= 1
            for k in (1, 2, 5):
                assert f"interp/blocks.{i}.resid_post/probe_k{k}_{f}" in tp2
        # Role is nearly a function of the token: a probe on the residual stream beats chance.
        assert tp2[f"interp/blocks.{i}.resid_post/probe_role"] > tp2[f"interp/blocks.{i}.resid_post/probe_role_chance"] + 0.1
        for tag in ("mig_hist20", "mig_ksg", "mono_mean", "mono_share"):
            assert 0 <= tp2[f"interp/blocks.{i}.mlp.act/{tag}"] <= 1
    # TensorBoard holds the same scalars and the density histograms.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "eval" / "tb"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    assert "eval/loss" in acc.Tags()["scalars"] and "interp/blocks.0.mlp.act/l0" in acc.Tags()["scalars"]
    assert acc.Scalars("eval/loss")[-1].value == pytest.approx(tp2["eval/loss"])
    assert "interp/blocks.0.mlp.act/log10_density" in acc.Tags()["histograms"]
    summary = (run_dir / "eval" / f"{STEPS}.md").read_text()
    assert (run_dir / "eval" / "summary.md").is_file()
    assert "## Capability" in summary and "blocks.0.mlp.act" in summary
    assert "## Capability" in stdout


def test_inspect_reports_the_largest_activations(run_dir):
    proc = _cli("inspect", str(run_dir), "--site", "blocks.1.mlp.act", "--unit", "5", "--top", "4", "--batches", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("top 4 activations of blocks.1.mlp.act unit 5")
    values = [float(line.split()[1]) for line in lines[1:]]
    assert values == sorted(values, reverse=True) and len(values) == 4
    assert all("«" in line and "»" in line for line in lines[1:])
    # The same maximum, computed directly on the TP=1 export.
    from spawn import run_ranks

    (direct,) = run_ranks(1, _max_activation, str(run_dir / "model.safetensors"), str(DATASET_DIR))
    assert values[0] == pytest.approx(direct, rel=1e-4)


def _max_activation(weights: str, dataset: str) -> float:
    import dataclasses

    from tti_dist.capture.hookpoints import ActivationCapture, resolve_hookpoints
    from tti_dist.data.loader import DistributedBatchLoader
    from tti_dist.data.prepare import run_windows
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel
    from tti_dist.models.gpt import GPT
    from tti_dist.train.export import load_exported

    groups = init_parallel(1, torch.device("cpu"), 60)
    try:
        model_cfg, state = load_exported(weights)
        model = GPT(model_cfg, groups)
        model.load_state_dict(state)
        model.eval()
        cfg = load_config(None, ["data.seq_len=32", "train.micro_batch_size=8", f"data.path={dataset}"])
        windows = run_windows(dataclasses.replace(cfg))
        batches = DistributedBatchLoader(windows, "val", 8, 0, 1, cfg.train.seed, shuffle=False).fixed_batches(2)
        hp = resolve_hookpoints(model, ["blocks.1.mlp.act"], "t")
        best = -math.inf
        with torch.no_grad(), ActivationCapture(hp) as cap:
            for b in batches:
                model(b[:, :-1])
                best = max(best, float(cap.captured["blocks.1.mlp.act"][..., 5].max()))
        return best
    finally:
        shutdown_parallel()


def test_eval_user_errors(run_dir, tmp_path):
    cases = [
        (["eval", str(run_dir), "--checkpoint", "99"], "--checkpoint: '99' not found"),
        (["eval", str(run_dir), "--data", str(tmp_path)], f"--data: '{tmp_path}' is not a dataset directory"),
        (["eval", str(run_dir), "--nproc", "1"], "--nproc: 1 must equal the run's parallel.tp_size 2"),
        (["eval", str(run_dir), "--weights", str(run_dir / "config.yaml")], "--weights:"),
        (["eval", str(run_dir), "--weights", str(tmp_path / "other.safetensors")], "holds a different model than RUN/config.yaml"),
        (["inspect", str(run_dir), "--site", "blocks.9.mlp.act", "--unit", "0"], "--site: 'blocks.9.mlp.act' is not a hookpoint"),
        (["inspect", str(run_dir), "--site", "blocks.0.mlp.act", "--unit", "128"], "--unit: 128 is not a unit of blocks.0.mlp.act (0..127)"),
    ]
    # An export of a different model (another hidden size): refused before any rank starts.
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={
        "format": "tti_dist.gpt", "model_config": json.dumps({"hidden_size": 48, "num_heads": 2})})
    procs = [subprocess.Popen([sys.executable, "-m", "tti_dist.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for (args, message), proc in zip(cases, procs):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, stderr)
        lines = [line for line in stderr.splitlines() if line.strip() and " INFO " not in line]
        assert len(lines) == 1 and lines[0].startswith("tti: error: ") and message in lines[0], (args, stderr)
