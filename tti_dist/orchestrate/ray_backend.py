"""The torch backend of a trial's Ray Train workers: Ray Train's own, plus the stop handler.

`tti train`'s ranks install `runtime/stop_request.py`'s SIGTERM/SIGINT handler from their main
thread. A Ray Train worker is an actor that runs the training function in a thread of its
own (Ray Train's ThreadRunner), and Python installs signal handlers from the main thread
only, so the trainer's `stop_request.install()` is a no-op there, and the worker would die
on Ray's own SIGTERM handler (SystemExit), losing the steps since the last checkpoint.

A backend's hooks run as actor tasks (`worker_group.execute`), and a synchronous actor (no
max_concurrency, no async methods, as Ray Train's worker is) runs its tasks on the process's
main thread. So `on_start`, after Ray Train's torch setup (MASTER_ADDR, the default process
group), installs the handler on every worker actor of the group; the training thread then
reads the same module state (`stop_request.requested()`). `on_shutdown` restores Ray's
handlers before Ray Train kills the actors. Each attempt's worker group is a set of fresh
actors, so each attempt installs the handler again. Only a trial with
`checkpoint.on_signal` uses this backend (orchestrate/trial.py); other actors keep Ray's
handler.

The two classes, `StopOnSignalTorchConfig` and `StopOnSignalTorchBackend`, subclass Ray
Train's, so they are defined on first access (module `__getattr__`): importing this module
does not import Ray, and orchestrate/trial.py imports it at module level while the sweep
modules stay free of Ray until a sweep runs (`tti train` never imports Ray). Once defined
they are ordinary attributes of this module, so Ray pickles them by reference as before.
"""

from __future__ import annotations

import logging

from tti_dist.runtime import stop_request

logger = logging.getLogger(__name__)

SHUTDOWN_WAIT_S = 5.0
"""How long the group's shutdown waits for the workers to restore Ray's signal handlers."""

_RAY_CLASSES = ("StopOnSignalTorchBackend", "StopOnSignalTorchConfig")


def __getattr__(name: str):
    if name in _RAY_CLASSES:
        globals().update(_define_ray_classes())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_ray_classes() -> dict[str, type]:
    """StopOnSignalTorchBackend and StopOnSignalTorchConfig, subclasses of Ray Train's torch
    backend and config."""
    # lazy: a Ray Train base class is needed to define them; importing the module must not import Ray
    import ray
    from ray.train.torch import TorchConfig

    torch_backend = TorchConfig().backend_cls
    # Ray Train's torch backend: MASTER_ADDR/PORT, RANK/LOCAL_RANK/WORLD_SIZE and the default
    # process group on every worker.

    class StopOnSignalTorchBackend(torch_backend):
        """Ray Train's torch backend, then stop_request's handler on each worker's main thread."""

        def on_start(self, worker_group, backend_config) -> None:
            super().on_start(worker_group, backend_config)
            installed = worker_group.execute(stop_request.install)
            if not all(installed):
                logger.warning("the SIGTERM/SIGINT handler could not be installed on %d of %d Ray Train workers "
                               "(not on their main thread): a signal there ends the worker without a checkpoint",
                               installed.count(False), len(installed))

        def on_shutdown(self, worker_group, backend_config) -> None:
            try:
                super().on_shutdown(worker_group, backend_config)
            finally:
                # Ray's handler again before Ray Train kills the actors: the raylet's kill sends
                # SIGTERM (then SIGKILL), which must end the worker, not ask it for a checkpoint.
                # Bounded: a dead worker answers with an error, a hung one is killed anyway.
                refs = worker_group.execute_async(stop_request.uninstall)
                ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_WAIT_S)

    class StopOnSignalTorchConfig(TorchConfig):
        """TorchConfig whose backend installs stop_request's handler on every worker (same fields)."""

        @property
        def backend_cls(self):
            return StopOnSignalTorchBackend

    classes = {}
    for cls in (StopOnSignalTorchBackend, StopOnSignalTorchConfig):
        # Module-level names, so that pickle finds them as attributes of this module.
        cls.__qualname__ = cls.__name__
        classes[cls.__name__] = cls
    return classes
