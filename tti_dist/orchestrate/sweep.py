"""`tti sweep SWEEP.yaml [--address ADDR] [--out DIR]`: a grid of trials on Ray Tune.

The sweep file and its trials: `tti_dist.orchestrate.sweep_config`; OUT and the checks
before Ray: `tti_dist.orchestrate.sweep_prepare`; resources: `tti_dist.orchestrate.sweep_resources`.

Everything is checked before Ray starts: the sweep's keys, every axis key against the base
config, every trial's config (validate_run_config), its dataset, and its resources against the
cluster's. Each trial is a Tune function trainable (0.1 CPU) that runs a Ray Train
TorchTrainer (tti_dist/orchestrate/trial.py); Tune schedules the trials as resources allow.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

from tti_dist.config.plugins import plugin_search_paths
from tti_dist.errors import ConfigError
from tti_dist.orchestrate.sweep_config import Sweep
from tti_dist.orchestrate.sweep_resources import check_resources, concurrent_trials, embedded_resources
from tti_dist.orchestrate.trial import DRIVER_CPUS, run_trial

logger = logging.getLogger(__name__)

EMBEDDED_OBJECT_STORE_BYTES = 256 * 1024**2
"""Object store of the embedded local Ray: trials pass only configs and metrics through it."""


class ProgressPrinter:
    """Tune callback: one line per trial state change, and a live summary line (at most
    every `summary_every_s` seconds) with each running trial's latest step and eval loss."""

    def __init__(self, names: dict[str, str], emit: Callable[[str], None], summary_every_s: float = 30.0):
        from ray.tune import Callback  # lazy: only a running sweep imports Ray

        class _Callback(Callback):
            def on_trial_start(cb, iteration, trials, trial, **info):
                self._state(trial, "RUNNING", trials)

            def on_trial_result(cb, iteration, trials, trial, result, **info):
                self.latest[trial.trial_id] = result
                self._summary(trials)

            def on_trial_complete(cb, iteration, trials, trial, **info):
                self._state(trial, "TERMINATED", trials)

            def on_trial_error(cb, iteration, trials, trial, **info):
                self._state(trial, "ERROR", trials)

        self.callback = _Callback()
        self.names = names
        self.emit = emit
        self.summary_every_s = summary_every_s
        self.latest: dict[str, dict] = {}
        self.start = time.monotonic()
        self.last_summary = self.start

    def _name(self, trial) -> str:
        return self.names.get(str(trial.config.get("trial")), trial.trial_id)

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.start)
        return f"{s // 60:02d}:{s % 60:02d}"

    def _state(self, trial, state: str, trials) -> None:
        result = self.latest.get(trial.trial_id, {})
        extra = ""
        if state != "RUNNING" and "eval/loss" in result:
            extra = f"  step {int(result.get('step', 0))}  eval/loss {result['eval/loss']:.4f}"
        counts = _count_states(trials, trial, state)
        self.emit(f"[{self._elapsed()}] {self._name(trial):<40} {state:<10}{extra}   ({counts})")

    def _summary(self, trials) -> None:
        now = time.monotonic()
        if now - self.last_summary < self.summary_every_s:
            return
        self.last_summary = now
        running = [t for t in trials if t.status == "RUNNING"]
        parts = []
        for t in running:
            r = self.latest.get(t.trial_id, {})
            loss = r.get("train/task_loss", r.get("eval/loss"))
            parts.append(f"{self._name(t)} step {int(r.get('step', 0))}" + (f" loss {loss:.3f}" if loss else ""))
        self.emit(f"[{self._elapsed()}] {_count_states(trials)}" + (" | " + "; ".join(parts) if parts else ""))


def _count_states(trials, changed=None, new_state: str | None = None) -> str:
    """"2 running, 1 pending, ..." with `changed` counted in its new state (Tune calls back
    before it updates the trial's status)."""
    counts: dict[str, int] = {}
    for t in trials:
        status = new_state if t is changed else t.status
        counts[status] = counts.get(status, 0) + 1
    order = ["RUNNING", "PENDING", "TERMINATED", "ERROR"]
    return ", ".join(f"{counts[s]} {s.lower()}" for s in order if counts.get(s))


def run_sweep(sweep: Sweep, specs: list, address: str | None, emit: Callable[[str], None] = logger.info) -> dict[str, str]:
    """Run every trial on Ray Tune; returns {trial name: "completed" | "failed"}.

    Without `address` an embedded local Ray is started (no dashboard, capped object store)
    and shut down afterwards; with one, the sweep joins that cluster. Resources are checked
    against the cluster before any trial starts."""
    import ray  # lazy: only a running sweep imports Ray
    from ray import tune  # lazy: as above

    if address is None:
        available = embedded_resources()
        # The plugin modules of `imports` where this process found them (e.g. the working
        # directory, on sys.path under `python -m` but not in a Ray worker's).
        pythonpath = plugin_search_paths(tuple(e for s in specs for e in s.cfg.imports))
        if pythonpath:
            pythonpath += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in pythonpath]
        # Worker output stays in Ray's session logs (printed below): the progress lines are
        # the sweep's output, and without a dashboard Ray Train's state-API monitor only
        # prints tracebacks here.
        context = ray.init(address="local", num_cpus=int(available["CPU"]), num_gpus=int(available.get("GPU", 0)),
                           include_dashboard=False, object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                           # Loopback only: a sweep on one machine opens no port to the network.
                           _node_ip_address="127.0.0.1",
                           logging_level=logging.WARNING, configure_logging=False, log_to_driver=False,
                           runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(pythonpath)}} if pythonpath else None)
        emit(f"embedded Ray: {available['CPU']:g} CPUs (one for the trial drivers), worker logs in "
             f"{context.address_info.get('session_dir', '/tmp/ray/session_latest')}/logs")
    else:
        try:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, RuntimeError) as exc:
            raise ConfigError(f"--address: cannot join the Ray cluster at {address!r} ({str(exc).splitlines()[0]})") from None
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # so `finally` shuts Ray down
    try:
        if address is not None:
            available = ray.cluster_resources()
            check_resources(specs, available, f"the cluster at {address}")
        concurrency = concurrent_trials(specs, available, sweep.max_concurrent_trials)
        emit(f"{len(specs)} trial(s), at most {concurrency} at a time")
        names = {str(i): s.name for i, s in enumerate(specs)}
        progress = ProgressPrinter(names, emit)
        storage = Path(specs[0].storage_path)
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, specs=specs), {"CPU": DRIVER_CPUS}),
            param_space={"trial": tune.grid_search(list(range(len(specs))))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrency,
                trial_name_creator=lambda t: names[str(t.config["trial"])],
                trial_dirname_creator=lambda t: names[str(t.config["trial"])],
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(storage), callbacks=[progress.callback],
                                      verbose=0),
        )
        grid = tuner.fit()
        outcome = {}
        for result in grid:
            name = names[str(result.config["trial"])]
            outcome[name] = "failed" if result.error is not None else "completed"
        return outcome
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous_sigterm)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
