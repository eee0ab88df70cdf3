"""One sweep trial on Ray Train: a `TorchTrainer` whose workers run `tti train`'s entry.

    trial driver (a Ray Tune function trainable, 0.1 CPU)
      -> TorchTrainer(worker_loop, ScalingConfig(num_workers = tp_size * dp_size, ...),
                      TorchConfig(gloo on CPU / nccl on GPU), FailureConfig(max_failures))
           each worker: Ray Train has started the default process group and set RANK,
           LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; `run_worker` (the same function
           `tti train` runs under torch's elastic agent) builds megatron-core's TP/DP groups,
           trains with DeepSpeed, and tells Ray about every logged step and checkpoint
      -> final evaluation on the trained workers (`tti eval` on the last checkpoint)
      -> RUN/trial.json and the TensorBoard hparams record (the driver)

Checkpoints. DeepSpeed writes its checkpoints into RUN/checkpoints as under `tti train`
(atomic, `latest`), so the run directory must be on storage every node sees. Ray is given a
*pointer* checkpoint (a small JSON naming the DeepSpeed tag), the pattern Ray's docs give for
checkpoints that live elsewhere: nothing large is copied. When a worker dies, Ray Train
restarts the whole worker group (FailureConfig.max_failures times); `worker_loop` reads the
pointer from `ray.train.get_checkpoint()` and resumes from exactly that DeepSpeed tag, with
the data order, regularizer samplers and metrics files restored (docs/training.md "Resume").

Signals. With checkpoint.on_signal, a SIGTERM/SIGINT that reaches a worker process stops the
trial as it stops `tti train`: every rank finishes its optimizer step and saves it
(ray_backend.py installs the handler on the actors' main threads); the workers then raise
StoppedBySignal, so Ray Train restarts the group from that checkpoint (one of the trial's
max_failures).

`import ray` happens only inside these functions: `tti train` never imports Ray.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tti_dist.config.schema import RunConfig
from tti_dist.eval.evaluate import run_eval
from tti_dist.eval.plan import prepare_eval
from tti_dist.metrics.metrics_table import metrics_path, read_metrics
from tti_dist.models.gpt import count_parameters
from tti_dist.orchestrate import ray_backend
from tti_dist.report.tensorboard import write_sweep_layout, write_trial_hparams
from tti_dist.rundir import RunDir
from tti_dist.train.worker import run_worker

logger = logging.getLogger(__name__)

POINTER_FILE = "tti_checkpoint.json"
"""The file in each Ray checkpoint: {"tag": "global_step<N>", "step": N, "checkpoint_dir": ...}."""

TRIAL_FILE = "trial.json"
"""RUN/trial.json: the trial's record (docs/sweeps.md), read by `tti report`."""

DRIVER_CPUS = 0.1
"""CPUs reserved for a trial's driver (the Tune trainable that only waits on Ray Train's
controller); Ray refuses a placement group bundle of {"CPU": 0}."""


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial's driver and workers need (pickled to them by Ray)."""

    name: str
    """Run directory name under OUT/runs."""
    run_dir: str
    """Absolute path of the trial's run directory (shared storage on a cluster)."""
    cfg: RunConfig
    """The trial's resolved, validated run config (data.path filled in)."""
    axes: dict[str, Any] = field(default_factory=dict)
    """This trial's value on each sweep axis."""
    model_size: str | None = None
    """Model-size preset, if the sweep has a model_size axis."""
    setting: str = "base"
    """Label of the axis values other than model_size and seed."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each training worker."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (0 on CPU; 1 for one GPU per rank)."""
    placement_strategy: str = "PACK"
    """Ray placement of the workers: PACK (TP groups on one node where possible), SPREAD,
    STRICT_PACK, STRICT_SPREAD (every worker on its own node)."""
    max_failures: int = 1
    """Worker-group restarts Ray Train attempts (FailureConfig.max_failures)."""
    eval_max_tokens: int | None = 2048
    """Tokens for the final evaluation's interpretability metrics; None skips the evaluation."""
    storage_path: str = ""
    """Ray Train's storage (OUT/ray): its run state and the pointer checkpoints."""

    @property
    def num_workers(self) -> int:
        """Training processes = the config's world size (tp_size x dp_size)."""
        return self.cfg.parallel.world_size

    def required_resources(self) -> dict[str, float]:
        """What the trial occupies while it runs: its workers and its driver."""
        need = {"CPU": self.num_workers * self.cpus_per_worker + DRIVER_CPUS}
        if self.gpus_per_worker:
            need["GPU"] = self.num_workers * self.gpus_per_worker
        return need


# -- the training workers ------------------------------------------------------------------


class RayStepReporter:
    """trainer.StepObserver that forwards the steps that evaluated or saved a checkpoint to
    `ray.train.report`, with a pointer checkpoint when the step saved one (rank 0 reports the
    pointer; every rank reports, since ray.train.report is a barrier over the workers).

    Not every logged step: Ray Train's controller takes one report per worker per poll
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default) and a report waits until the
    previous one was taken, so reporting every `log_every` steps of a fast model paced the
    training at log_every steps per 2 s (a 1-layer model trained 10x slower under Ray than
    under `tti train`). Eval and checkpoint steps are the same on every rank (a barrier needs
    that), carry what Tune and the sweep's progress lines read (step, losses, eval/loss), and
    the full record is in the trial's metrics.parquet and TensorBoard files anyway."""

    def __init__(self, run_dir: str, rank: int):
        self.ckpt_dir = RunDir(Path(run_dir)).checkpoints
        self.rank = rank

    def __call__(self, step: int, scalars: dict[str, float], checkpoint_tag: str | None) -> None:
        import ray.train  # lazy: `tti train` runs the same trainer and never imports Ray

        metrics = _finite(scalars)
        if checkpoint_tag is None:
            if "eval/loss" in scalars:
                ray.train.report(metrics)
            return
        name = f"checkpoint_{checkpoint_tag}"
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory() as tmp:
            pointer = {"tag": checkpoint_tag, "step": step, "checkpoint_dir": str(self.ckpt_dir)}
            (Path(tmp) / POINTER_FILE).write_text(json.dumps(pointer))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def _finite(scalars: dict[str, float]) -> dict[str, float]:
    # NaN (e.g. an unmeasured grad norm) would poison Tune's metric bookkeeping.
    return {k: float(v) for k, v in scalars.items() if _is_number(v)}


def resume_tag_from_ray() -> str | None:
    """The DeepSpeed tag of the last checkpoint reported to Ray (None on a first attempt)."""
    import ray.train  # lazy: importing the sweep modules must not import Ray

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return json.loads((Path(path) / POINTER_FILE).read_text())["tag"]


class NonFiniteTrial(RuntimeError):
    """A trial's loss or gradient went non-finite under `train.nonfinite: stop`."""


class StoppedBySignal(RuntimeError):
    """A signal stopped the trial's workers after they saved a checkpoint of that step.

    Raised by every rank after `run_worker` returns a result with `stopped_by`, so that the
    worker group fails and Ray Train restarts it (FailureConfig.max_failures) from that
    checkpoint."""


def worker_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: one rank of the trial."""
    spec: TrialSpec = config["spec"]
    tag = resume_tag_from_ray()
    if tag is not None and not (RunDir(Path(spec.run_dir)).checkpoints / tag).is_dir():
        tag = None  # pruned by checkpoint.keep_last after a newer one Ray had not yet registered
    source = "ray" if tag is not None else None
    if tag is None:
        # A worker can die after DeepSpeed finished a checkpoint but before Ray's controller
        # registered its pointer. The run directory belongs to this trial alone (tti sweep
        # refuses an OUT that holds runs), so a complete checkpoint there was written by an
        # earlier attempt of this trial: continue from it rather than start over.
        tag = RunDir(Path(spec.run_dir)).latest_tag()
        source = "run_dir" if tag is not None else None
    if tag is not None:
        logger.info("restarted by Ray Train: resuming %s from %s", spec.name, tag)
    rank = int(os.environ.get("RANK", "0"))
    record_worker_start(spec.run_dir, rank, tag, source)
    after = _final_evaluation(spec) if spec.eval_max_tokens else _report_done
    result = run_worker(spec.cfg, spec.run_dir, resume=tag is not None, resume_tag=tag,
                        observer=RayStepReporter(spec.run_dir, rank), after_train=_unless_stopped(after))
    if result.nonfinite:
        # train.nonfinite: stop. The trial fails with the step and tag; Ray Train's restart
        # (if max_failures allows one) resumes from the last good checkpoint and meets the
        # same step again.
        raise NonFiniteTrial(f"{result.nonfinite}; no update was applied (train.nonfinite: stop)")
    if result.stopped_by:
        # SIGTERM/SIGINT reached a worker (ray_backend.py installs the handler): every rank
        # finished the step, saved it and reported it (rank 0 with the pointer). Ray Train's
        # controller takes one report per worker per poll and registers a checkpoint once it
        # has every rank's report of that step; a report waits until the worker's previous
        # one was taken. So this report (a barrier over the ranks) returns once the
        # checkpoint's report was taken, and Ray registers the checkpoint before it sees the
        # failure below: the restarted workers resume from it through Ray's pointer.
        import ray.train  # lazy: importing the sweep modules must not import Ray

        ray.train.report({"step": result.final_step})
        # Fail the group so that Ray Train restarts it from that checkpoint (a worker that
        # returned would end the trial as completed).
        raise StoppedBySignal(f"{result.stopped_by} stopped the trial after step {result.final_step}; checkpoint "
                              f"{result.last_checkpoint} saved; Ray Train restarts the workers from it")


def _unless_stopped(after_train):
    """after_train hook that skips `after_train` (the final evaluation) when a signal stopped
    the run (the restarted workers train on and evaluate at the end) or a non-finite step did
    (the trial fails)."""

    def hook(cfg, run_dir, groups, result) -> None:
        if not result.stopped_by and not result.nonfinite:
            after_train(cfg, run_dir, groups, result)

    return hook


WORKERS_FILE = "workers.jsonl"
"""RUN/workers.jsonl: one line per worker start (rank, Ray node, pid, checkpoint resumed from
and whether Ray's pointer or the run directory named it)."""


def record_worker_start(run_dir: str, rank: int, resumed_from: str | None, resumed_via: str | None = None) -> None:
    """Append this worker's placement to RUN/workers.jsonl: where each rank ran, and every
    restart with the checkpoint it resumed from and how it was found ("ray": the pointer
    from ray.train.get_checkpoint(); "run_dir": the run's latest complete checkpoint,
    when the worker died before Ray registered the pointer). One O_APPEND write per line."""
    import ray  # lazy: importing the sweep modules must not import Ray

    line = json.dumps({"time": time.time(), "rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                       "hostname": socket.gethostname(), "pid": os.getpid(), "resumed_from": resumed_from,
                       "resumed_via": resumed_via})
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir) / WORKERS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_worker_starts(run_dir: str | Path) -> list[dict]:
    """The records of RUN/workers.jsonl, oldest first."""
    path = Path(run_dir) / WORKERS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _report_done(cfg, run_dir, groups, result) -> None:
    import ray.train  # lazy: importing the sweep modules must not import Ray

    ray.train.report({"step": result.final_step})


def _final_evaluation(spec: TrialSpec):
    """after_train hook: `tti eval` of the final checkpoint on the trained workers.

    Evaluation runs at data-parallel size 1 (docs/evaluation.md): the TP group of DP replica
    0 evaluates (a private size-1 DP group each) while the other replicas wait; rank 0
    writes RUN/eval/ and reports the scalars to Ray."""

    def evaluate(cfg, run_dir, groups, result) -> None:
        import ray.train  # lazy: importing the sweep modules must not import Ray

        scalars: dict[str, float] = {}
        own_dp = dist.new_group([groups.rank], use_local_synchronization=True)
        if groups.dp_rank == 0:
            plan = prepare_eval(run_dir, max_tokens=spec.eval_max_tokens)
            eval_groups = dataclasses.replace(groups, dp_group=own_dp, dp_rank=0, dp_size=1)
            scalars = run_eval(plan, eval_groups)  # ends with a barrier over all ranks
        elif groups.world_size > 1:
            dist.barrier()
        # (Never a key named "done": Ray Tune stops a trial that reports done=True.)
        ray.train.report({"step": result.final_step, **_finite(scalars)})

    return evaluate


# -- the trial driver (a Ray Tune trainable) ------------------------------------------------


def build_torch_trainer(spec: TrialSpec, callbacks=()):
    """The TorchTrainer of one trial: workers and resources from the parallel layout."""
    # lazy: importing the sweep modules must not import Ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if spec.cfg.checkpoint.on_signal:
        # SIGTERM/SIGINT to a worker: finish the step, save it, restart from it (ray_backend.py).
        torch_config_cls = ray_backend.StopOnSignalTorchConfig
    else:
        torch_config_cls = TorchConfig  # Ray's handler: the worker dies, the last periodic checkpoint resumes
    use_gpu = spec.gpus_per_worker > 0
    resources = {"CPU": spec.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    return TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec},
        torch_config=torch_config_cls(backend="nccl" if use_gpu else "gloo", timeout_s=spec.cfg.train.dist_timeout_s),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=spec.placement_strategy),
        run_config=RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            # Ray keeps every pointer (bytes each); DeepSpeed's keep_last prunes the real ones.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=list(callbacks),
            # The workers must find the package and the dataset the driver resolved.
            worker_runtime_env={"env_vars": _worker_env(spec)},
        ),
    )


def _worker_env(spec: TrialSpec) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS") if k in os.environ}
    if not spec.gpus_per_worker:
        # DeepSpeed picks its accelerator at import; a CPU worker on a GPU node needs the CPU one.
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_trial(config: dict, specs: list[TrialSpec]) -> None:
    """Ray Tune function trainable (config {"trial": index into specs}): run that trial's
    TorchTrainer and record the outcome in RUN/trial.json."""
    # lazy: importing the sweep modules must not import Ray
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = specs[int(config["trial"])]
    # Ray Train gives a worker group 60 s to start by default; importing torch, megatron-core
    # and DeepSpeed in fresh processes on a busy node can take longer. (Read by the
    # controller, which inherits this process's environment.)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    status, error = "completed", None
    try:
        build_torch_trainer(spec, callbacks=[TuneReportCallback()]).fit()
    except Exception as exc:  # the trial failed for good: record it, let Tune mark it ERROR
        status, error = "failed", _one_line(exc)
        write_trial_record(spec, status, error)
        raise
    write_trial_record(spec, status, error)


def _one_line(exc: BaseException) -> str:
    """The last line of the error (Ray's errors end with the worker's own), at most 500 chars."""
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]


def final_scalars(run_dir: str | Path) -> tuple[dict[str, float], int, int]:
    """(the last logged value of every training scalar merged with the final evaluation's,
    tokens trained and optimizer steps at the last logged step)."""
    out: dict[str, float] = {}
    tokens = step = 0
    # A directory of Parquet parts (a single file for runs written by older versions).
    if metrics_path(run_dir).exists():
        table = read_metrics(run_dir).to_pylist()
        for row in table:  # rows are in step order; later rows win
            tokens = max(tokens, int(row.get("tokens") or 0))
            step = max(step, int(row.get("step") or 0))
            out.update({k: v for k, v in row.items() if k not in ("step", "tokens") and _is_number(v)})
    eval_dir = RunDir(Path(run_dir)).eval
    evals = sorted(eval_dir.glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
    evals = [p for p in evals if p.stem.isdigit()]
    if evals:
        scalars = json.loads(evals[-1].read_text())  # {tag: value} (tti_dist/eval/outputs.py)
        out.update({k: float(v) for k, v in scalars.items() if _is_number(v)})
    return out, tokens, step


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def write_trial_record(spec: TrialSpec, status: str, error: str | None) -> dict:
    """RUN/trial.json (docs/sweeps.md) and, for a completed trial, the TensorBoard hparams."""
    cfg = spec.cfg
    final, tokens, last_step = final_scalars(spec.run_dir)
    workers = read_worker_starts(spec.run_dir)
    record = {
        "trial": spec.name,
        "axes": spec.axes,
        "model_size": spec.model_size,
        "setting": spec.setting,
        "seed": cfg.train.seed,
        "num_params": count_parameters(cfg.model),
        "steps": last_step,
        "tokens": tokens,
        "coefficients": {r.name: r.coefficient for r in cfg.regularizers},
        # Architectural sparsity (top-k MLP, mask, bottleneck, MoE): a trial with any is not a
        # baseline even when every regularizer coefficient is 0.
        "sparsity_options": cfg.model.sparsity_options(),
        "status": status,
        "error": error,
        # Ray Train restarts of the worker group (each resumed from the checkpoint named in
        # RUN/workers.jsonl) and the distinct Ray nodes the workers ran on.
        "restarts": max(0, sum(1 for w in workers if w["rank"] == 0) - 1),
        "nodes": sorted({w["node_id"] for w in workers}),
        "final": final,
    }
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (TRIAL_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, run_dir / TRIAL_FILE)
    if status == "completed" and cfg.logging.tensorboard:
        write_trial_hparams(RunDir(run_dir).tensorboard, trial_hparams(record, cfg), final, step=last_step or None)
        # Each trial writes the custom-scalars layout of its own tags; TensorBoard merges
        # the layouts of all runs, so every trial's lines share the sweep's charts.
        write_sweep_layout(RunDir(run_dir).tensorboard, sorted(final))
    return record


def trial_hparams(record: dict, cfg: RunConfig) -> dict[str, Any]:
    """The hparams plugin record: model size, parameters, tokens, seed, layout, every axis
    and every regularizer coefficient."""
    hp: dict[str, Any] = {
        "model_size": record["model_size"] or "base",
        "num_params": record["num_params"],
        "tokens": record["tokens"],
        "seed": record["seed"],
        "setting": record["setting"],
        "num_layers": cfg.model.num_layers,
        "hidden_size": cfg.model.hidden_size,
        "tp_size": cfg.parallel.tp_size,
        "dp_size": cfg.parallel.dp_size,
    }
    for name, coeff in record["coefficients"].items():
        hp[f"coeff/{name}"] = coeff
    for key, value in record["axes"].items():
        hp.setdefault(f"axis/{key}", value if isinstance(value, (int, float, str, bool)) else str(value))
    return hp
