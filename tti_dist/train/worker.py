"""The per-rank entry point: the same function runs under the local launcher and Ray.

It sets up logging and threads, starts the process groups, trains, and tears everything
down, whatever happens. The config arrives validated (validation happens once, in the
launching process, before any process group starts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from tti_dist.config.schema import RunConfig
from tti_dist.distributed.groups import ParallelGroups, init_parallel, resolve_device, shutdown_parallel
from tti_dist.utils.logging import setup_logging

logger = logging.getLogger(__name__)


def quiet_dependency_warnings(device: torch.device | None = None) -> None:
    """Silence dependency notices that do not apply to this run, once per rank.

    - megatron-core recommends CUDA_DEVICE_MAX_CONNECTIONS=1 for async TP all-reduce; on
      CPU there is no CUDA (on GPU the worker sets the variable instead).
    - torch deprecates all_gather_into_tensor, which DeepSpeed ZeRO calls; not ours to fix.
    """
    if device is None or device.type == "cpu":
        warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.* is deprecated")


def set_cpu_threads(device: torch.device) -> None:
    """Split the machine's cores between the local ranks (intra-op threads)."""
    if device.type != "cpu":
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))


@contextlib.contextmanager
def rank_session(cfg: RunConfig, tp_size: int, ep_size: int | None = None) -> Iterator[ParallelGroups]:
    """One rank's setup and teardown, shared by train, eval, sae fit and inspect: logging,
    device, dependency notices, CPU threads, the process groups (TP degree `tp_size`;
    expert-parallel degree `ep_size` for MoE models), and their teardown whatever happens."""
    setup_logging(cfg.logging.level)
    device = resolve_device(cfg.train.device)
    quiet_dependency_warnings(device)
    if device.type == "cuda":
        # Megatron's TP layers overlap their all-reduce with compute only when kernels are
        # queued in issue order on one hardware queue.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    set_cpu_threads(device)
    groups = init_parallel(tp_size, device, cfg.train.dist_timeout_s, ep_size)
    try:
        yield groups
    finally:
        shutdown_parallel()


class CollectiveFailure(RuntimeError):
    """A collective failed because a peer rank stopped answering or vanished."""


def explain_collective_failure(exc: RuntimeError, timeout_s: int) -> CollectiveFailure | None:
    """The one-line reason for a failed gloo/NCCL collective, or None for other errors.

    The backends' own messages name a source line and a transport buffer; the launcher
    prints this instead, as the failed rank's reason."""
    text = str(exc)
    # gloo: "[...transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv ...";
    # NCCL's watchdog: "Watchdog caught collective operation timeout: ...".
    if "Timed out waiting" in text or "collective operation timeout" in text:
        return CollectiveFailure(
            f"a collective did not complete within train.dist_timeout_s = {timeout_s} s: a peer rank stopped "
            "responding (hung, stopped or unreachable)")
    if "Connection closed by peer" in text or "Connection reset by peer" in text or "Broken pipe" in text:
        return CollectiveFailure("a peer rank vanished during a collective (its process died)")
    return None


def run_worker(cfg: RunConfig, run_dir: str, resume: bool = False, resume_tag: str | None = None,
               observer=None, after_train=None):
    """Train one rank of `cfg` into `run_dir`; returns its TrainResult.

    `resume_tag` names the checkpoint to continue from (default: RUN/checkpoints/latest);
    `observer` is a trainer.StepObserver; `after_train(cfg, run_dir, groups, result)` runs on
    every rank while the process groups are still up (Ray trials evaluate there)."""
    from tti_dist.train import stop_request

    if cfg.checkpoint.on_signal:
        # From the start, so that a signal during setup (building the model and engine,
        # loading a checkpoint) also ends the run after its first step, saved.
        stop_request.install()
    try:
        ep_size = cfg.parallel.ep_size if cfg.model.moe_num_experts else None
        with rank_session(cfg, cfg.parallel.tp_size, ep_size) as groups:
            from tti_dist.train.trainer import Trainer

            trainer = Trainer(cfg, Path(run_dir), groups, resume=resume, resume_tag=resume_tag, observer=observer)
            try:
                result = trainer.train()
            except RuntimeError as exc:
                explained = explain_collective_failure(exc, cfg.train.dist_timeout_s)
                if explained is None:
                    raise
                raise explained from exc
            logger.info("finished at step %d", result.final_step)
            del trainer  # free the engine before anything else runs on this rank
            if after_train is not None:
                after_train(cfg, run_dir, groups, result)
    finally:
        if cfg.checkpoint.on_signal:
            stop_request.uninstall()
    if result.stopped_by and os.environ.get("TORCHELASTIC_RUN_ID"):
        # Under torch's elastic agent a rank that returns waits for the agent to collect its
        # result, which a signalled agent never does (it only waits `signal_grace_s`, then
        # kills): exit now, with the code that tells the launcher "stopped, checkpoint saved".
        from tti_dist.train.stop_request import EXIT_STOPPED

        raise SystemExit(EXIT_STOPPED)
    return result
