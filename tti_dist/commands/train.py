"""`tti train CONFIG [--set k=v ...] [--run-dir RUN] [--nproc N] [--resume]`: train on N local ranks.

prepare_train loads, overrides and validates the config, checks the run directory (resume
compatibility, every rank's RNG file) and resolves the dataset, all before a process
starts; then the ranks train under torch's elastic agent (tti_dist.train.worker).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from tti_dist.config import ignored_settings, load_config
from tti_dist.config.schema import RunConfig
from tti_dist.data.prepare import prepare_run_data
from tti_dist.errors import EXIT_RUN_FAILED, EXIT_STOPPED, ConfigError
from tti_dist.regularizers.validation import validate_run_config
from tti_dist.rundir import RunDir
from tti_dist.train.checkpoint import read_rng_state

logger = logging.getLogger("tti_dist.cli")


def prepare_train(args: argparse.Namespace) -> tuple[RunConfig, Path, int]:
    """Load, override and validate the config and check the run directory (no processes yet)."""
    cfg = load_config(args.config, args.overrides)
    nproc = args.nproc if args.nproc is not None else cfg.parallel.world_size
    # Only a given --nproc is checked here; a bad default (tp_size * dp_size) is reported by
    # validation as the parallel.* field it comes from.
    if args.nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc: {nproc} must be >= 1")
    validate_run_config(cfg, world_size=nproc)
    for note in ignored_settings(cfg):  # on the user's config, before data.path is resolved
        logger.warning(note)

    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.resume:
        raise ConfigError("--resume: needs --run-dir naming the run to continue")
    else:
        run_dir = Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir: '{run_dir}' is a file, not a directory; name a new or existing run directory")
    run = RunDir(run_dir)
    latest = run.latest_tag()
    if args.resume:
        if latest is None:
            raise ConfigError(f"--resume: '{run_dir}' holds no complete checkpoint to resume from")
        run.check_resume_compatible(cfg)
        # Every rank's RNG file is read here first, so a refused one is one line before
        # launch rather than a traceback from the rank that reads it.
        for rank in range(nproc):
            read_rng_state(run.checkpoints / latest, rank)
    elif latest is not None:
        raise ConfigError(
            f"--run-dir: '{run_dir}' already holds checkpoints; pass --resume to continue it or choose another directory"
        )
    created = not run_dir.exists()
    try:
        cfg = prepare_run_data(cfg, run_dir)
    except ConfigError:
        if created:  # bad input leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return cfg, run_dir, nproc


def main(args: argparse.Namespace) -> int:
    # Validate first: a user error answers in a second, before megatron-core and the
    # launcher are imported.
    cfg, run_dir, nproc = prepare_train(args)
    # lazy: megatron-core and the trainer load only after validation passed
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from tti_dist.runtime.failures import describe_failures
    from tti_dist.runtime.session import quiet_dependency_warnings
    from tti_dist.runtime.stop_request import signal_name
    from tti_dist.train.worker import launch_local

    quiet_dependency_warnings()
    logger.info("run directory: %s (%d processes)", run_dir, nproc)
    run = RunDir(run_dir)
    try:
        results = launch_local(cfg, str(run_dir), nproc, resume=args.resume)
    except ChildFailedError as exc:
        if all(f.exitcode == EXIT_STOPPED for f in exc.failures.values()):
            # The ranks alone were signalled (not this process): each saved and exited so.
            print(f"tti: stopped by a signal to the ranks. {run.resume_hint()}", file=sys.stderr)
            return EXIT_STOPPED
        # Each rank that raised printed its traceback; end with one line naming the dead.
        print(f"tti: training failed: {describe_failures(exc.failures)}. {run.resume_hint()}",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    except SignalException as exc:
        # This process was signalled; the agent forwarded the signal and the ranks, which
        # save on it (checkpoint.on_signal), have exited.
        print(f"tti: stopped by {signal_name(exc.sigval)}. {run.resume_hint()}", file=sys.stderr)
        saved = cfg.checkpoint.on_signal and run.latest_tag() is not None
        return EXIT_STOPPED if saved else EXIT_RUN_FAILED
    result = results[min(results)]
    if result.nonfinite:
        print(f"tti: {result.nonfinite}; no update was applied and the run stopped (train.nonfinite: stop). "
              f"{run.resume_hint()}", file=sys.stderr)
        return EXIT_RUN_FAILED
    if result.stopped_by:
        print(f"tti: stopped by {result.stopped_by} after step {result.final_step}. {run.resume_hint()}",
              file=sys.stderr)
        return EXIT_STOPPED
    if result.losses:
        first, last = min(result.losses), max(result.losses)
        print(f"trained to step {result.final_step}: train/task_loss {result.losses[first]:.4f} (step {first}) "
              f"-> {result.losses[last]:.4f} (step {last})")
    if result.eval_losses:
        step = max(result.eval_losses)
        print(f"eval/loss {result.eval_losses[step]:.4f} at step {step}")
    print(f"run directory: {run_dir}")
    return 0
