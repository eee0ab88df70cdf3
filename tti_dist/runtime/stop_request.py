"""Stop requests from signals: a preempted or interrupted run saves before it exits.

Slurm and Kubernetes send SIGTERM and wait a grace period (Slurm's KillWait, Kubernetes'
terminationGracePeriodSeconds) before SIGKILL, precisely so a job can save; Ctrl-C sends
SIGINT. With `checkpoint.on_signal` (the default) every rank installs `install()`'s handler,
which only records the signal. The trainer reads `requested()` at each optimizer step, the
ranks agree on it in the step's one flag all-reduce (so they stop after the same step even
when the signal reached them at different moments), save a checkpoint of that step, flush
their metrics and return; the launcher exits with EXIT_STOPPED.

A second signal while the run is already stopping is logged and ignored: the save in
progress finishes (it is atomic anyway: train/checkpoint.py). Only SIGKILL ends it early.

Handlers can only be installed from a process's main thread. `tti train` runs each rank's
training in its main thread; Ray Train runs the training function in a thread of the worker
actor, so the Ray trial installs the handler from the actor's main thread (orchestrate/trial.py)
and the training thread reads the same module state.
"""

from __future__ import annotations

import logging
import signal
import threading

from tti_dist.errors import EXIT_STOPPED

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals that stop a run after a checkpoint (the ranks then exit with
tti_dist.errors.EXIT_STOPPED)."""

_requested: int = 0
_previous: dict[int, object] = {}


def _handle(signum: int, frame) -> None:
    global _requested
    if _requested:
        logger.warning("received %s while stopping; the checkpoint being saved is finished first",
                       signal.Signals(signum).name)
        return
    _requested = signum
    logger.warning("received %s: finishing the current optimizer step, then saving a checkpoint and stopping",
                   signal.Signals(signum).name)


def install() -> bool:
    """Record SIGTERM/SIGINT instead of dying on them; False when not on the main thread
    (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in STOP_SIGNALS:
        previous = signal.signal(sig, _handle)
        _previous.setdefault(sig, previous)
    return True


def uninstall() -> None:
    """Restore the handlers `install` replaced (main thread only) and forget any request."""
    global _requested
    if threading.current_thread() is threading.main_thread():
        for sig, previous in _previous.items():
            signal.signal(sig, previous)
        _previous.clear()
    _requested = 0


def requested() -> int:
    """The signal number that asked this process to stop, 0 if none."""
    return _requested


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
