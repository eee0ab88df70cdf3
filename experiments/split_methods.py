"""Split a sweep with several sparsity methods into one report directory per method, so each
method's interpretability tax is measured against the same baselines on its own frontier
(`tti report` puts every trial of a size and seed on one frontier).

    python experiments/split_methods.py SWEEP_DIR [--axis method] [--baseline baseline]

For every method family (the axis value's text up to the first '-': "l1-0.1" -> "l1"),
SWEEP_DIR/by_method/<family>/ gets a sweep.yaml naming it and runs/<trial> symbolic links to
that family's trials and to the baseline trials, then `tti report` runs on it. The trials
themselves are not copied or changed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def families(sweep: Path, axis: str, baseline: str) -> dict[str, list[Path]]:
    """Family name -> trial directories (baseline trials are in every family)."""
    groups: dict[str, list[Path]] = {}
    base: list[Path] = []
    for record_path in sorted(sweep.glob("runs/*/trial.json")):
        record = json.loads(record_path.read_text())
        value = str(record.get("axes", {}).get(axis))
        if value == baseline:
            base.append(record_path.parent)
        else:
            groups.setdefault(value.split("-", 1)[0], []).append(record_path.parent)
    return {name: base + trials for name, trials in groups.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--axis", default="method")
    parser.add_argument("--baseline", default="baseline")
    args = parser.parse_args()
    for name, trials in families(args.sweep, args.axis, args.baseline).items():
        out = args.sweep / "by_method" / name
        shutil.rmtree(out, ignore_errors=True)
        (out / "runs").mkdir(parents=True)
        (out / "sweep.yaml").write_text(f"name: {args.sweep.name}-{name}\naxes: {{}}\n")
        for trial in trials:
            os.symlink(trial.resolve(), out / "runs" / trial.name)
        print(f"== {name}: {len(trials)} trials -> {out}", flush=True)
        code = subprocess.call([sys.executable, "-m", "tti_dist.cli", "report", str(out)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
