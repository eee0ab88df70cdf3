"""Sweeps on real Ray (loopback only; every test shuts its cluster down).

- a 2-trial sweep on the embedded local Ray through the CLI: run directories, trial
  records, TensorBoard hparams and layout read back with EventAccumulator, `tti report`,
  and `tti tensorboard` answering the trials' scalars over HTTP; its base config imports a
  regularizer plugin by path (which must reach the Ray processes) and logs to W&B offline
  (each trial one W&B run of the sweep's group, read back with `wandb leet inspect`);
- a trial on a `ray.cluster_utils.Cluster` of 2 simulated nodes (joined by address):
  STRICT_SPREAD puts its 2 workers on different nodes; one is SIGKILLed mid-trial, Ray
  Train restarts the worker group from the last checkpoint, and the trial's metrics equal
  an uninterrupted `tti train` of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tti_dist.metrics.wandb_sink import wandb_run_id_path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "scaling_base.yaml"
PLUGIN = ROOT / "tests" / "plugins" / "tti_plugin_example.py"
TINY = ["train.steps=8", "optim.warmup_steps=2", "train.eval_every=4", "checkpoint.every=4", "logging.log_every=2",
        "train.micro_batch_size=4", "train.eval_batches=2", "data.seq_len=32", "model.max_seq_len=32"]


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The plugin must reach Ray's processes through tti, not through an inherited path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and Path(p).resolve() != PLUGIN.parent)
    return env


def _tti(*args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, "-m", "tti_dist.cli", *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tti {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _write_sweep(path: Path, axes: dict, **extra) -> Path:
    doc = {"name": path.stem, "base": str(BASE), "set": TINY, "axes": axes, "eval": {"max_tokens": 256}, **extra}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _plugged_base(tmp_path: Path) -> Path:
    """BASE plus a regularizer plugin imported by path (tests/plugins is on no worker's
    PYTHONPATH: the Ray processes get it by unpickling the config, which imports the plugin
    first) and W&B logging in offline mode."""
    cfg = yaml.safe_load(BASE.read_text())
    cfg["imports"] = [str(PLUGIN)]
    cfg["regularizers"].append({"type": "weight_lp", "name": "wlp", "coefficient": 0.5,
                                "layers": ["blocks.*.mlp.fc1"]})
    cfg["logging"]["wandb"] = {"project": "tti-test", "mode": "offline"}
    path = tmp_path / "plugged_base.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_local_sweep_writes_runs_hparams_report_and_serves_tensorboard(tmp_path):
    """Two trials on the embedded Ray: runs, trial records, hparams, the report and TensorBoard;
    with a regularizer plugin in every Ray process and each trial a W&B run of the sweep's group."""
    sweep = _write_sweep(tmp_path / "two.yaml", {"model_size": ["xs"], "regularizers.0.coefficient": [0.0, 0.05]},
                         base=str(_plugged_base(tmp_path)))
    out = tmp_path / "out"
    proc = _tti("sweep", sweep, "--out", out)
    assert "2/2 trials completed" in proc.stdout
    # One line per trial state change: each trial RUNNING then TERMINATED.
    assert sum(" RUNNING " in line for line in proc.stdout.splitlines()) == 2
    assert sum(" TERMINATED " in line for line in proc.stdout.splitlines()) == 2

    runs = sorted(p for p in (out / "runs").iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["t000-xs-coefficient0.0", "t001-xs-coefficient0.05"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hp_metadata

    for run, coeff in zip(runs, (0.0, 0.05)):
        record = json.loads((run / "trial.json").read_text())
        assert record["status"] == "completed" and record["restarts"] == 0
        assert record["model_size"] == "xs" and record["coefficients"] == {"l1_mlp": coeff, "wlp": 0.5}
        assert record["tokens"] == 8 * 4 * 32 and record["steps"] == 8
        metrics = pq.read_table(run / "metrics.parquet").to_pydict()
        assert metrics["step"][-1] == 8
        # The plugin's term is in the objective: total = task + coeff * L1 + 0.5 * weight_lp.
        for task, total, l1, wlp in zip(metrics["train/task_loss"], metrics["train/total_loss"],
                                        metrics["reg/l1_mlp/loss"], metrics["reg/wlp/loss"]):
            assert wlp > 1e-4 and total - task == pytest.approx(coeff * l1 + 0.5 * wlp, abs=2e-6)
        # The trial is one W&B run, named after its run directory, grouped by the sweep's name,
        # with the values of metrics.parquet.
        (offline,) = sorted((run / "wandb").glob("offline-run-*"))
        inspected = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(offline), "--json"],
                                   capture_output=True, text=True, timeout=120, env=_env())
        assert inspected.returncode == 0, inspected.stderr[-2000:]
        rows = [json.loads(line) for line in inspected.stdout.splitlines() if line.strip()]
        (wandb_run,) = [r["run"] for r in rows if r["type"] == "run"]
        assert wandb_run["run_id"] == wandb_run_id_path(run).read_text().strip()
        assert wandb_run["run_group"] == "two" and wandb_run["display_name"] == run.name
        history = {int(r["history"]["step"]["num"]): r["history"]["item"] for r in rows if r["type"] == "history"}
        assert [history[s]["reg/wlp/loss"] for s in metrics["step"]] == metrics["reg/wlp/loss"]
        # The record's final values are the run's last logged and evaluated values.
        assert record["final"]["train/task_loss"] == pytest.approx(metrics["train/task_loss"][-1])
        evaluation = json.loads((run / "eval" / "8.json").read_text())
        assert record["final"]["eval/loss"] == pytest.approx(evaluation["eval/loss"])
        assert "interp/blocks.0.mlp.act/l0" in record["final"]

        acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
        start = next(hp_metadata.parse_session_start_info_plugin_data(acc.SummaryMetadata(tag).plugin_data.content)
                     for tag in content if tag == hp_metadata.SESSION_START_INFO_TAG)
        hparams = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
        assert hparams["model_size"] == "xs"
        assert hparams["num_params"] == record["num_params"] > 0
        assert hparams["coeff/l1_mlp"] == pytest.approx(coeff)
        assert hparams["tokens"] == record["tokens"]
        assert "custom_scalars__config__" in acc.Tags()["tensors"]  # the sweep's layout

    report = _tti("report", out)
    assert (out / "summary.parquet").is_file() and (out / "report.md").is_file()
    summary = pq.read_table(out / "summary.parquet").to_pydict()
    assert sorted(summary["trial"]) == [p.name for p in runs]
    assert list((out / "plots").glob("*.png")), report.stdout

    # tti tensorboard serves the sweep (OUT/runs) on loopback.
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tti_dist.cli", "tensorboard", str(out), "--port", str(port)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        run = f"{runs[1].name}/tb"
        deadline = time.monotonic() + 90
        points = None
        while time.monotonic() < deadline:
            try:
                query = urllib.parse.urlencode({"run": run, "tag": "train/task_loss"})
                points = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")
                if len(points) == 4:
                    break
            except OSError:
                pass
            time.sleep(1)
        metrics = pq.read_table(runs[1] / "metrics.parquet").to_pydict()
        assert [p[1] for p in points] == metrics["step"]
        assert [p[2] for p in points] == pytest.approx(metrics["train/task_loss"], rel=1e-6)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def _descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_trial_spread_over_two_nodes_survives_a_killed_worker_and_matches(tmp_path):
    """2 simulated nodes (ray.cluster_utils.Cluster), `tti sweep --address`: STRICT_SPREAD
    puts the trial's 2 workers on different nodes; one is SIGKILLed once Ray has registered
    a checkpoint; Ray Train restarts the group, which resumes from Ray's pointer; every
    logged number equals an uninterrupted `tti train` of the same config."""
    import ray
    from ray.cluster_utils import Cluster

    sweep = _write_sweep(tmp_path / "kill.yaml", {"model_size": ["xs"]}, max_failures=2, eval=False,
                         resources={"cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD"})
    out = tmp_path / "out"
    run = out / "runs" / "t000-xs"
    settings = ["parallel.dp_size=2", "train.steps=200", "checkpoint.every=10", "checkpoint.keep_last=0",
                "train.eval_every=100", "logging.log_every=10"]
    snapshot = out / "ray" / "t000-xs" / "checkpoint_manager_snapshot.json"  # Ray Train's registered checkpoints
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "object_store_memory": 100 * 1024**2})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
        cluster.wait_for_nodes()
        cmd = [sys.executable, "-m", "tti_dist.cli", "sweep", str(sweep), "--out", str(out),
               "--address", cluster.address]
        for setting in settings:
            cmd += ["--set", setting]
        driver = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            # Kill once Ray's controller has registered a checkpoint (its snapshot names it),
            # so the restart must come from Ray's pointer.
            deadline = time.monotonic() + 400
            registered = lambda: snapshot.is_file() and "checkpoint_global_step" in snapshot.read_text()  # noqa: E731
            while time.monotonic() < deadline and driver.poll() is None and not registered():
                time.sleep(0.05)
            if not registered():
                driver.kill()
                raise AssertionError(f"no checkpoint registered with Ray:\n{driver.communicate()[0][-4000:]}")
            assert not (run / "trial.json").exists(), "the trial ended before the kill"
            workers = [p for p in _descendants(os.getpid()) if "RayTrainWorker" in " ".join(p.cmdline())]
            assert len(workers) == 2
            workers[-1].send_signal(signal.SIGKILL)
            # The uninterrupted reference, `tti train` of the trial's own resolved config,
            # runs while Ray restarts the trial (mostly waiting on process start-up).
            reference = tmp_path / "reference"
            reference_proc = subprocess.Popen(
                [sys.executable, "-m", "tti_dist.cli", "train", str(run / "config.yaml"), "--run-dir", str(reference)],
                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output, _ = driver.communicate(timeout=500)
            reference_output, _ = reference_proc.communicate(timeout=300)
        finally:
            for proc in (driver, locals().get("reference_proc")):
                if proc is not None and proc.poll() is None:
                    proc.kill()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert driver.returncode == 0, output[-4000:]
    assert "1/1 trials completed" in output

    record = json.loads((run / "trial.json").read_text())
    assert record["status"] == "completed" and record["restarts"] == 1
    starts = [json.loads(line) for line in (run / "workers.jsonl").read_text().splitlines()]
    first, second = starts[:2], starts[2:]
    assert sorted(s["rank"] for s in first) == sorted(s["rank"] for s in second) == [0, 1]
    # STRICT_SPREAD: the two ranks of each attempt ran on different nodes.
    assert first[0]["node_id"] != first[1]["node_id"] and second[0]["node_id"] != second[1]["node_id"]
    assert [s["resumed_from"] for s in first] == [None, None]
    resumed = {s["resumed_from"] for s in second}
    assert len(resumed) == 1 and int(resumed.pop().removeprefix("global_step")) >= 10
    assert {s["resumed_via"] for s in second} == {"ray"}  # ray.train.get_checkpoint()'s pointer

    assert reference_proc.returncode == 0, reference_output[-4000:]
    got = pq.read_table(run / "metrics.parquet").to_pydict()
    want = pq.read_table(reference / "metrics.parquet").to_pydict()
    assert got["step"] == want["step"] == list(range(10, 201, 10))
    for tag in ("train/task_loss", "train/total_loss", "train/grad_norm", "eval/loss", "reg/l1_mlp/loss"):
        assert _same(got[tag], want[tag]), (tag, got[tag], want[tag])


def _same(got: list, want: list) -> bool:
    """Equal lists of optional floats (None where a step has no value; NaN equals NaN)."""
    import math

    return len(got) == len(want) and all(
        (a is None and b is None) or (a is not None and b is not None
                                      and (math.isclose(a, b, rel_tol=1e-6) or (math.isnan(a) and math.isnan(b))))
        for a, b in zip(got, want))
