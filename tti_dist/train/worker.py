"""The per-rank entry point: the same function runs under the local launcher and Ray.

It sets up logging and threads, starts the process groups, trains, and tears everything
down, whatever happens. The config arrives validated (validation happens once, in the
launching process, before any process group starts).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tti_dist.config.schema import RunConfig
from tti_dist.runtime import stop_request
from tti_dist.runtime.launcher import launch_ranks
from tti_dist.runtime.session import explain_collective_failure, rank_session
from tti_dist.train.trainer import Trainer

logger = logging.getLogger(__name__)


def run_worker(cfg: RunConfig, run_dir: str, resume: bool = False, resume_tag: str | None = None,
               observer=None, after_train=None):
    """Train one rank of `cfg` into `run_dir`; returns its TrainResult.

    `resume_tag` names the checkpoint to continue from (default: RUN/checkpoints/latest);
    `observer` is a trainer.StepObserver; `after_train(cfg, run_dir, groups, result)` runs on
    every rank while the process groups are still up (Ray trials evaluate there)."""
    if cfg.checkpoint.on_signal:
        # From the start, so that a signal during setup (building the model and engine,
        # loading a checkpoint) also ends the run after its first step, saved.
        stop_request.install()
    try:
        ep_size = cfg.parallel.ep_size if cfg.model.moe_num_experts else None
        with rank_session(cfg, cfg.parallel.tp_size, ep_size) as groups:
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
        raise SystemExit(stop_request.EXIT_STOPPED)
    return result


def launch_local(cfg: RunConfig, run_dir: str, nproc: int, resume: bool = False) -> dict:
    """Train `cfg` into `run_dir` on `nproc` local processes; returns {rank: TrainResult}."""
    return launch_ranks(run_worker, nproc, cfg, run_dir, resume, grace_s=cfg.checkpoint.signal_grace_s)
