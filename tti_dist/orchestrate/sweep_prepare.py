"""Preparing a sweep's output directory OUT: the trials' run directories and specs, each
distinct dataset built once, OUT/sweep.yaml, and the checks that need no Ray (`preflight`).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import yaml

from tti_dist.data.prepare import prepare_run_data
from tti_dist.errors import ConfigError
from tti_dist.orchestrate.sweep_config import Sweep
from tti_dist.orchestrate.sweep_resources import check_address, check_resources, embedded_resources
from tti_dist.orchestrate.trial import TrialSpec


def trial_specs(sweep: Sweep, out: str | Path) -> list:
    """The TrialSpecs of the sweep with OUT's layout (datasets not yet resolved)."""
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
