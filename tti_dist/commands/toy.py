"""`tti toy CONFIG --run-dir RUN [--set key=value ...] [--overwrite]`: Toy Models of
Superposition, a sparsity sweep of batched toy models or the n = 2, m = 1 phase diagram
(the config's `experiment`).

Config and run-directory checks come first: one-line errors before anything trains.
"""

from __future__ import annotations

import argparse

from tti_dist.toy.phase_run import format_phase_summary, run_phase_diagram
from tti_dist.toy.run import format_summary, prepare_toy, run_toy


def main(args: argparse.Namespace) -> int:
    cfg, run_dir = prepare_toy(args.config, args.overrides, args.run_dir, overwrite=args.overwrite)
    if cfg.experiment == "phase_diagram":
        print(format_phase_summary(run_phase_diagram(cfg, run_dir)))
    else:
        print(format_summary(run_toy(cfg, run_dir)))
    print(f"run directory: {run_dir}")
    return 0
