"""`tti sweep SWEEP.yaml [--address ADDR] [--out DIR]`: a grid of trials on Ray Tune.

A sweep file (docs/sweeps.md) names a base run config and axes; the trial list is the
cartesian product of the axes, in file order (the last axis varies fastest):

    name: demo
    base: ../smoke_synth.yaml            # a run config, relative to this file
    set: [train.steps=60]                # --set overrides for every trial
    axes:
      model_size: [s, m, l]              # presets (tti_dist/orchestrate/presets.py)
      regularizers.0.coefficient: [0.0, 0.03]   # any --set key
      seed: [1, 2]                       # short for train.seed
    resources: {cpus_per_worker: 1, gpus_per_worker: 0}
    max_failures: 1                      # Ray Train restarts per trial (from the last checkpoint)
    max_concurrent_trials: 0             # 0: as many as the resources allow
    eval: {max_tokens: 2048}             # final `tti eval` of each trial; false skips it

An axis whose values are mappings sets several keys per value (`name:` labels the value):

      regularization:
        - {name: none, regularizers.0.coefficient: 0}
        - {name: l1-relu, regularizers.0.coefficient: 0.03, model.mlp_activation: relu}

A plain run config is a one-trial sweep (this is how `tti submit CONFIG` runs on a cluster).

Everything is checked before Ray starts: the sweep's keys, every axis key against the base
config, every trial's config (validate_config), its dataset, and its resources against the
cluster's. Each trial is a Tune function trainable (0.1 CPU) that runs a Ray Train
TorchTrainer (tti_dist/orchestrate/trial.py); Tune schedules the trials as resources allow.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from tti_dist.config.load import apply_override, config_from_dict, read_yaml_mapping
from tti_dist.config.schema import RunConfig
from tti_dist.errors import ConfigError
from tti_dist.orchestrate.presets import MODEL_SIZE_AXIS, preset_overrides, resolve_presets

logger = logging.getLogger(__name__)

SWEEP_KEYS = ("name", "base", "set", "axes", "presets", "resources", "max_failures", "max_concurrent_trials", "eval")
RESOURCE_KEYS = ("cpus_per_worker", "gpus_per_worker", "placement_strategy")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SEED_AXES = ("seed", "train.seed")
EMBEDDED_OBJECT_STORE_BYTES = 256 * 1024**2
"""Object store of the embedded local Ray: trials pass only configs and metrics through it."""


@dataclass(frozen=True)
class TrialPlan:
    """One point of the grid, validated (its dataset not yet built)."""

    name: str
    """Run directory name: t<index>-<axis values>."""
    axes: dict[str, Any]
    """Axis key -> this trial's value (the label for mapping-valued axes)."""
    overrides: tuple[str, ...]
    """Every --set override applied to the base config, in order."""
    cfg: RunConfig
    """The trial's validated config."""
    model_size: str | None
    """The model_size axis value, if any."""
    setting: str
    """Label of the axis values other than model_size and seed ("base" when none)."""


@dataclass(frozen=True)
class Sweep:
    """A loaded, fully validated sweep file."""

    name: str
    path: str
    axes: dict[str, list]
    trials: tuple[TrialPlan, ...]
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    placement_strategy: str = "PACK"
    max_failures: int = 1
    max_concurrent_trials: int = 0
    eval_max_tokens: int | None = 2048


# -- loading and validation ----------------------------------------------------------------


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read and check a sweep file (or a plain run config: a one-trial sweep); every problem
    is a one-line ConfigError naming the key."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    if "axes" not in raw and "base" not in raw:  # a run config
        raw = {"name": path.stem, "base": path.name, "axes": {}}
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"sweep.{key}: unknown key in '{path}'; valid keys: {', '.join(SWEEP_KEYS)}")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"sweep.name: {name!r} may contain only letters, digits, '_', '.', '-'")
    if "base" not in raw or not isinstance(raw["base"], str):
        raise ConfigError(f"sweep.base: {raw.get('base')!r} must name the base run config (a path relative to the sweep file)")
    base_path = (path.parent / raw["base"]).resolve()
    base_raw = read_yaml_mapping(base_path)
    common = _string_list(raw.get("set", []), "sweep.set") + list(overrides)
    for override in common:
        apply_override(base_raw, override)
    presets = resolve_presets(raw.get("presets"), "sweep.presets")
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"sweep.axes: expected a mapping of axis -> list of values, got {axes!r}")
    axes = {str(k): v for k, v in axes.items()}
    for key, values in axes.items():
        _check_axis(key, values, base_raw, presets)
    resources = _resources(raw.get("resources"), base_raw)
    max_failures = _int(raw.get("max_failures", 1), "sweep.max_failures", 0)
    max_concurrent = _int(raw.get("max_concurrent_trials", 0), "sweep.max_concurrent_trials", 0)
    eval_max_tokens = _eval_tokens(raw.get("eval", {"max_tokens": 2048}))

    trials = []
    keys = list(axes)
    for index, combo in enumerate(itertools.product(*(axes[k] for k in keys))):
        trials.append(_plan_trial(index, dict(zip(keys, combo)), base_raw, common, presets))
    return Sweep(name=name, path=str(path), axes=axes, trials=tuple(trials), cpus_per_worker=resources[0],
                 gpus_per_worker=resources[1], placement_strategy=resources[2], max_failures=max_failures, max_concurrent_trials=max_concurrent,
                 eval_max_tokens=eval_max_tokens)


def _string_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {value!r} must be a list of key=value strings")
    return list(value)


def _int(value, where: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{where}: {value!r} must be an integer >= {low}")
    return value


def _eval_tokens(value) -> int | None:
    if value is False or value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"max_tokens"}:
        raise ConfigError(f"sweep.eval: {value!r} must be false or {{max_tokens: N}}")
    return _int(value.get("max_tokens", 2048), "sweep.eval.max_tokens", 16)


def _resources(value, base_raw: dict) -> tuple[float, float, str]:
    value = value or {}
    if not isinstance(value, dict):
        raise ConfigError(f"sweep.resources: expected a mapping ({', '.join(RESOURCE_KEYS)}), got {value!r}")
    for key in value:
        if key not in RESOURCE_KEYS:
            raise ConfigError(f"sweep.resources.{key}: unknown key; valid keys: {', '.join(RESOURCE_KEYS)}")
    device = (base_raw.get("train") or {}).get("device", "auto")
    cpus = value.get("cpus_per_worker", 1)
    gpus = value.get("gpus_per_worker", 1 if device == "cuda" else 0)
    for key, v in (("cpus_per_worker", cpus), ("gpus_per_worker", gpus)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"sweep.resources.{key}: {v!r} must be a number >= 0")
    if cpus <= 0:
        raise ConfigError(f"sweep.resources.cpus_per_worker: {cpus!r} must be > 0 (a worker needs a CPU slot)")
    if device == "cuda" and gpus == 0:
        raise ConfigError("sweep.resources.gpus_per_worker: 0, but train.device is cuda; give each worker a GPU (1)")
    strategy = value.get("placement_strategy", "PACK")
    if strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(f"sweep.resources.placement_strategy: {strategy!r}; allowed: {', '.join(PLACEMENT_STRATEGIES)}")
    return float(cpus), float(gpus), strategy


def _axis_settings(key: str, value, presets: dict) -> tuple[list[str], Any]:
    """(--set overrides, label) of one axis value."""
    where = f"sweep.axes.{key}"
    if isinstance(value, dict):
        label = str(value.get("name", ""))
        sets = [f"{k}={_yaml_scalar(v)}" for k, v in value.items() if k != "name"]
        if not sets:
            raise ConfigError(f"{where}: {value!r} sets no config key")
        return sets, label or ",".join(sets)
    if key == MODEL_SIZE_AXIS:
        return preset_overrides(value, presets, where), value
    target = "train.seed" if key == "seed" else key
    return [f"{target}={_yaml_scalar(value)}"], value


def _yaml_scalar(value) -> str:
    """A value as --set text (YAML flow), so lists and mappings survive the round trip."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip() \
        if not isinstance(value, str) else value


def _check_axis(key: str, values, base_raw: dict, presets: dict) -> None:
    """The axis is a non-empty list and each value, applied to the base config on its own,
    gives a valid run config (so a misspelt key is blamed on its axis)."""
    from tti_dist.config import validate_config

    where = f"sweep.axes.{key}"
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {values!r} must be a non-empty list of values")
    for value in values:
        sets, _ = _axis_settings(key, value, presets)
        trial_raw = copy.deepcopy(base_raw)
        try:
            for s in sets:
                apply_override(trial_raw, s)
            cfg = config_from_dict(trial_raw)
            validate_config(cfg, world_size=cfg.parallel.world_size)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _plan_trial(index: int, combo: dict[str, Any], base_raw: dict, common: list[str], presets: dict) -> TrialPlan:
    from tti_dist.config import validate_config

    trial_raw = copy.deepcopy(base_raw)
    sets: list[str] = []
    labels: dict[str, Any] = {}
    for key, value in combo.items():
        axis_sets, label = _axis_settings(key, value, presets)
        sets += axis_sets
        labels[key] = label
    for s in sets:
        apply_override(trial_raw, s)
    name = _trial_name(index, labels)
    try:
        cfg = config_from_dict(trial_raw)
        validate_config(cfg, world_size=cfg.parallel.world_size)
    except ConfigError as exc:
        raise ConfigError(f"trial {name} ({_describe(labels)}): {exc}") from None
    size = labels.get(MODEL_SIZE_AXIS)
    rest = {k: v for k, v in labels.items() if k != MODEL_SIZE_AXIS and k not in SEED_AXES}
    setting = _describe(rest) if rest else "base"
    return TrialPlan(name=name, axes=labels, overrides=tuple(common + sets), cfg=cfg,
                     model_size=str(size) if size is not None else None, setting=setting)


def _describe(labels: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items())


def _trial_name(index: int, labels: dict[str, Any]) -> str:
    parts = [f"t{index:03d}"]
    for key, value in labels.items():
        short = key.rsplit(".", 1)[-1]
        text = f"{value}" if key == MODEL_SIZE_AXIS else f"{short}{value}"
        parts.append(re.sub(r"[^A-Za-z0-9_.=+-]", "_", text))
    return "-".join(parts)[:120]


# -- preparing the output directory --------------------------------------------------------


def trial_specs(sweep: Sweep, out: str | Path) -> list:
    """The TrialSpecs of the sweep with OUT's layout (datasets not yet resolved)."""
    from tti_dist.orchestrate.trial import TrialSpec

    out = Path(out).resolve()
    return [TrialSpec(name=plan.name, run_dir=str(out / "runs" / plan.name), cfg=plan.cfg, axes=plan.axes,
                      model_size=plan.model_size, setting=plan.setting, cpus_per_worker=sweep.cpus_per_worker,
                      gpus_per_worker=sweep.gpus_per_worker, placement_strategy=sweep.placement_strategy,
                      max_failures=sweep.max_failures, eval_max_tokens=sweep.eval_max_tokens,
                      storage_path=str(out / "ray"))
            for plan in sweep.trials]


def preflight(sweep: Sweep, out: str | Path, address: str | None) -> None:
    """Checks that need no Ray: OUT is free, the address answers, and (embedded Ray) every
    trial fits this machine. The cluster's resources are checked once connected."""
    out = Path(out).resolve()
    if (out / "runs").is_dir() and any((out / "runs").iterdir()):
        raise ConfigError(f"--out: '{out}' already holds a sweep's runs; choose another directory")
    if address is None:
        check_resources(trial_specs(sweep, out), embedded_resources(), "this machine (embedded Ray)")
    else:
        check_address(address)


def prepare_trials(sweep: Sweep, out: str | Path) -> list:
    """Create OUT, build each distinct dataset once (OUT/data/d<k>), write OUT/sweep.yaml and
    return the TrialSpecs with data.path resolved. Bad data leaves no OUT behind."""
    from tti_dist.data.prepare import prepare_run_data

    out = Path(out).resolve()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        homes: dict[str, Path] = {}
        specs = []
        for spec in trial_specs(sweep, out):
            key = repr(dataclasses.astuple(spec.cfg.data))
            home = homes.setdefault(key, out / "data" / f"d{len(homes)}")
            specs.append(dataclasses.replace(spec, cfg=prepare_run_data(spec.cfg, home)))
    except ConfigError:
        if created:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    write_sweep_file(sweep, specs, out)
    return specs


def write_sweep_file(sweep: Sweep, specs: list, out: Path) -> None:
    """OUT/sweep.yaml: the sweep as given and the expanded trial list."""
    doc = {
        "name": sweep.name,
        "source": str(Path(sweep.path).resolve()),
        "axes": sweep.axes,
        "resources": {"cpus_per_worker": sweep.cpus_per_worker, "gpus_per_worker": sweep.gpus_per_worker,
                      "placement_strategy": sweep.placement_strategy},
        "max_failures": sweep.max_failures,
        "trials": [{"name": s.name, "axes": s.axes, "overrides": list(p.overrides), "run_dir": s.run_dir}
                   for s, p in zip(specs, sweep.trials)],
    }
    (out / "sweep.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


# -- resources -----------------------------------------------------------------------------


def embedded_resources() -> dict[str, float]:
    """What the embedded local Ray (loopback only) offers: the machine's cores plus one logical CPU for the
    trial drivers (each reserves 0.1 CPU and only waits on Ray Train's controller, so a
    trial whose workers use every core still fits), and its GPUs."""
    import torch

    resources = {"CPU": float((os.cpu_count() or 1) + 1)}
    if torch.cuda.is_available():
        resources["GPU"] = float(torch.cuda.device_count())
    return resources


def check_resources(specs: list, available: dict[str, float], where: str) -> None:
    """ConfigError naming the first trial (TrialSpec) that can never be scheduled on `available`."""
    for spec in specs:
        need = spec.required_resources()
        for resource, amount in need.items():
            have = available.get(resource, 0.0)
            if amount > have + 1e-9:
                raise ConfigError(
                    f"trial {spec.name}: its layout (parallel.tp_size x dp_size = {spec.num_workers} workers x "
                    f"{spec.cpus_per_worker:g} CPU, {spec.gpus_per_worker:g} GPU each, plus 0.1 CPU for its driver) "
                    f"needs {amount:g} {resource} but {where} has {have:g}; shrink the layout or "
                    "resources.cpus_per_worker/gpus_per_worker, or add nodes")


def concurrent_trials(specs: list, available: dict[str, float], requested: int) -> int:
    """How many trials may run at once.

    A Tune trial reserves only its driver (0.1 CPU); Ray Train asks for the workers later. So
    Tune alone would start every driver and leave their worker groups queueing for CPUs (Ray
    Train's docs say to cap max_concurrent_trials). The cap is the number of the largest
    trial's whole footprint (workers + driver) that fits the cluster, or `requested` if
    smaller: n = min over resources r of floor(available_r / need_r)."""
    fits = None
    for spec in specs:
        for resource, amount in spec.required_resources().items():
            n = int(available.get(resource, 0.0) // amount) if amount else None
            if n is not None:
                fits = n if fits is None else min(fits, n)
    fits = max(1, fits or 1)
    return min(fits, requested) if requested else fits


def check_address(address: str) -> None:
    """A `host:port` GCS address must accept a TCP connection (one-line error, in seconds)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address: {address!r} must be 'auto' or the cluster's HOST:PORT (the GCS port, 6379 by default)")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ConfigError(f"--address: nothing answers at {address} ({exc.strerror or exc}); "
                          "is the head running (ray start --head)?") from None


# -- running -------------------------------------------------------------------------------


class ProgressPrinter:
    """Tune callback: one line per trial state change, and a live summary line (at most
    every `summary_every_s` seconds) with each running trial's latest step and eval loss."""

    def __init__(self, names: dict[str, str], emit: Callable[[str], None], summary_every_s: float = 30.0):
        from ray.tune import Callback

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
    import ray
    from ray import tune

    from tti_dist.orchestrate.trial import DRIVER_CPUS, run_trial

    if address is None:
        available = embedded_resources()
        # Worker output stays in Ray's session logs (printed below): the progress lines are
        # the sweep's output, and without a dashboard Ray Train's state-API monitor only
        # prints tracebacks here.
        context = ray.init(address="local", num_cpus=int(available["CPU"]), num_gpus=int(available.get("GPU", 0)),
                           include_dashboard=False, object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                           # Loopback only: a sweep on one machine opens no port to the network.
                           _node_ip_address="127.0.0.1",
                           logging_level=logging.WARNING, configure_logging=False, log_to_driver=False)
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
