"""Sweep files: reading one, checking every key, and expanding it into its validated trials.

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

Everything in the file is checked here, before Ray starts: the sweep's keys, every axis key
against the base config and every trial's config (validate_run_config). The rest of the
preflight (datasets, resources) is `tti_dist.orchestrate.sweep_prepare`'s.

The base config's `imports` (regularizer plugins; a relative .py path is relative to the base
config's directory) are imported while the trials are checked. With `logging.wandb`, each
trial is a W&B run of its own, named after its run directory and grouped by the sweep's name
unless the config sets a group.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tti_dist.config.load import apply_override, config_from_dict, read_yaml_mapping
from tti_dist.config.schema import RunConfig
from tti_dist.errors import ConfigError
from tti_dist.orchestrate.presets import MODEL_SIZE_AXIS, preset_overrides, resolve_presets
from tti_dist.regularizers.validation import validate_run_config

SWEEP_KEYS = ("name", "base", "set", "axes", "presets", "resources", "max_failures", "max_concurrent_trials", "eval")
RESOURCE_KEYS = ("cpus_per_worker", "gpus_per_worker", "placement_strategy")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SEED_AXES = ("seed", "train.seed")


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
    base_dir = base_path.parent  # relative .py paths in `imports` are the base config's
    for key, values in axes.items():
        _check_axis(key, values, base_raw, presets, base_dir)
    resources = _resources(raw.get("resources"), base_raw)
    max_failures = _int(raw.get("max_failures", 1), "sweep.max_failures", 0)
    max_concurrent = _int(raw.get("max_concurrent_trials", 0), "sweep.max_concurrent_trials", 0)
    eval_max_tokens = _eval_tokens(raw.get("eval", {"max_tokens": 2048}))

    trials = []
    keys = list(axes)
    for index, combo in enumerate(itertools.product(*(axes[k] for k in keys))):
        trials.append(_plan_trial(index, dict(zip(keys, combo)), base_raw, common, presets, name, base_dir))
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


def _check_axis(key: str, values, base_raw: dict, presets: dict, base_dir: Path) -> None:
    """The axis is a non-empty list and each value, applied to the base config on its own,
    gives a valid run config (so a misspelt key is blamed on its axis)."""
    where = f"sweep.axes.{key}"
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {values!r} must be a non-empty list of values")
    for value in values:
        sets, _ = _axis_settings(key, value, presets)
        trial_raw = copy.deepcopy(base_raw)
        try:
            for s in sets:
                apply_override(trial_raw, s)
            cfg = config_from_dict(trial_raw, base_dir=base_dir)
            validate_run_config(cfg, world_size=cfg.parallel.world_size)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _plan_trial(index: int, combo: dict[str, Any], base_raw: dict, common: list[str], presets: dict,
                sweep_name: str, base_dir: Path) -> TrialPlan:
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
        cfg = config_from_dict(trial_raw, base_dir=base_dir)
        validate_run_config(cfg, world_size=cfg.parallel.world_size)
    except ConfigError as exc:
        raise ConfigError(f"trial {name} ({_describe(labels)}): {exc}") from None
    cfg = _wandb_grouped(cfg, sweep_name)
    size = labels.get(MODEL_SIZE_AXIS)
    rest = {k: v for k, v in labels.items() if k != MODEL_SIZE_AXIS and k not in SEED_AXES}
    setting = _describe(rest) if rest else "base"
    return TrialPlan(name=name, axes=labels, overrides=tuple(common + sets), cfg=cfg,
                     model_size=str(size) if size is not None else None, setting=setting)


def _wandb_grouped(cfg: RunConfig, sweep_name: str) -> RunConfig:
    """With logging.wandb and no group: the sweep's name as the W&B group, so that every
    trial is a W&B run of its own (named by default after its run directory) and the trials
    of one sweep appear together."""
    w = cfg.logging.wandb
    if w is None or w.group is not None:
        return cfg
    return dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb=dataclasses.replace(w, group=sweep_name)))


def _describe(labels: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items())


def _trial_name(index: int, labels: dict[str, Any]) -> str:
    parts = [f"t{index:03d}"]
    for key, value in labels.items():
        short = key.rsplit(".", 1)[-1]
        text = f"{value}" if key == MODEL_SIZE_AXIS else f"{short}{value}"
        parts.append(re.sub(r"[^A-Za-z0-9_.=+-]", "_", text))
    return "-".join(parts)[:120]
