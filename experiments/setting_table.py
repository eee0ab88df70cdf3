"""Per size and setting of a sweep: the validation loss above the same seed's baseline and the
sparsity reached, over whatever seeds have finished (docs/experiments/scaling_cpu.md).

    python experiments/setting_table.py SWEEP_DIR [--axis method] [--baseline baseline]

The interpretability tax of `tti report` compares sizes at one common sparsity level; when
larger models' baselines are already sparser than the smallest model's most regularized
trial, that level is trivial for them (tax 0 by definition). This table is the plain view:
for every (size, setting), over seeds r with both a trial and a baseline,
    delta(r) = eval/loss(setting, r) - eval/loss(baseline, r),
its mean, sample sd and n, and the mean l0_frac of the last block's MLP units.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

L0 = "interp/blocks.last.mlp.act/l0_frac"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--axis", default="method")
    parser.add_argument("--baseline", default="baseline")
    args = parser.parse_args()
    trials = {}
    for path in sorted(args.sweep.glob("runs/*/trial.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "completed":
            continue
        final = r["final"]
        last = max((int(k.split(".")[1]) for k in final if k.startswith("interp/blocks.") and k.endswith("/l0")),
                   default=None)
        l0 = units = None
        if last is not None:
            l0 = final.get(f"interp/blocks.{last}.mlp.act/l0")
            units = final.get(f"interp/blocks.{last}.mlp.act/num_units")
        trials[(r["model_size"], str(r["axes"][args.axis]), r["seed"])] = (
            final["eval/loss"], l0 / units if l0 is not None and units else float("nan"), r["num_params"])
    sizes = sorted({k[0] for k in trials}, key=lambda s: next(v[2] for k, v in trials.items() if k[0] == s))
    settings = list(dict.fromkeys(k[1] for k in trials))
    print("| size | params | setting | seeds | eval/loss − baseline (mean ± sd) | l0_frac (mean) |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        for setting in settings:
            deltas, fracs = [], []
            for (s, st, seed), (loss, frac, params) in trials.items():
                if s == size and st == setting and (size, args.baseline, seed) in trials:
                    deltas.append(loss - trials[(size, args.baseline, seed)][0])
                    fracs.append(frac)
            if not deltas:
                continue
            n = len(deltas)
            mean = sum(deltas) / n
            sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1)) if n > 1 else float("nan")
            params = next(v[2] for k, v in trials.items() if k[0] == size)
            print(f"| {size} | {params:,} | {setting} | {n} | {mean:+.4f} ± {sd:.4f} | {sum(fracs) / n:.4f} |")


if __name__ == "__main__":
    main()
