"""`tti toy CONFIG --run-dir RUN [--set key=value ...] [--overwrite]`: Toy Models of
Superposition, a sparsity sweep of batched toy models.

Config and run-directory checks come first: one-line errors before anything trains.
"""

from __future__ import annotations

import argparse

from tti_dist.toy.run import format_summary, prepare_toy, run_toy


def main(args: argparse.Namespace) -> int:
    cfg, run_dir = prepare_toy(args.config, args.overrides, args.run_dir, overwrite=args.overwrite)
    summary = run_toy(cfg, run_dir)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    return 0
