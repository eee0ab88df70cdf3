"""`tti report DIR [--metric TAG ...] [--target VALUE]`: summary table, Pareto frontiers and
interpretability tax of a sweep, with the tax's noise floor; warnings (unconverged
baselines, a width-dependent metric) are logged and listed in report.md."""

from __future__ import annotations

import argparse

from tti_dist.report.markdown import format_tax
from tti_dist.report.sweep_report import write_report


def main(args: argparse.Namespace) -> int:
    result = write_report(args.sweep_dir, metrics=args.metrics or None, target=args.target)
    for path in [result["summary"], *result["plots"], result["report"]]:
        print(f"wrote {path}")
    if result["taxes"]:
        print(format_tax(result["taxes"]))
    for note in result["notes"]:
        print(f"note: {note}")
    if result["warnings"]:
        # The lines themselves went to the log (stderr); stdout says where they are kept.
        print(f"{len(result['warnings'])} warning(s), listed under \"Warnings\" in {result['report']}")
    return 0
