"""`tti sweep SWEEP [--address ADDR] [--out DIR] [--set k=v ...]`: a sweep on Ray Tune + Ray Train.

Everything is checked (sweep keys, every trial's config and dataset) before Ray starts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tti_dist.errors import EXIT_RUN_FAILED
from tti_dist.orchestrate.sweep import run_sweep
from tti_dist.orchestrate.sweep_config import load_sweep
from tti_dist.orchestrate.sweep_prepare import preflight, prepare_trials


def main(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, args.overrides)
    out = Path(args.out) if args.out else Path("sweeps") / f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    preflight(sweep, out, args.address)
    specs = prepare_trials(sweep, out)
    print(f"sweep {sweep.name}: {len(specs)} trial(s) -> {out}", flush=True)
    outcome = run_sweep(sweep, specs, args.address, emit=lambda line: print(line, flush=True))
    failed = [name for name, status in outcome.items() if status != "completed"]
    print(f"{len(outcome) - len(failed)}/{len(outcome)} trials completed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(f"runs: {out / 'runs'}   report: tti report {out}   TensorBoard: tti tensorboard {out}")
    return EXIT_RUN_FAILED if failed else 0
