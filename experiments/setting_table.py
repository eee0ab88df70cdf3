"""Per size and setting of a sweep: the validation loss above the same seed's baseline and the
sparsity reached, over whatever seeds have finished (docs/experiments/scaling_cpu.md).

    python experiments/setting_table.py SWEEP_DIR [--axis method] [--baseline baseline]

The interpretability tax of `tti report` compares sizes at one common sparsity level; when
larger models' baselines are already sparser than the smallest model's most regularized
trial, that level is trivial for them (tax 0 by definition). This table is the plain view:
for every (size, setting), over seeds r with both a trial and a baseline,
    delta(r) = eval/loss(setting, r) - eval/loss(baseline, r),
its mean, sample sd and n, the standard error and the report's verdict (|mean| >
t(0.975, n-1) x SE, tti_dist.report.noise), and the mean l0_frac of the last block's MLP units.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from tti_dist.report.noise import tax_noise

L0 = "interp/blocks.last.mlp.act/l0_frac"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--axis", default="method")
    parser.add_argument("--baseline", default="baseline")
    parser.add_argument("--plot", type=Path, help="also draw loss above baseline vs parameters, one line per setting")
    args = parser.parse_args()
    trials = {}
    for path in sorted(args.sweep.glob("runs/*/trial.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "completed" or r.get("final", {}).get("eval/loss") is None:
            continue  # failed, or no validation loss to compare
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
    rows = []
    print("| size | params | setting | seeds | eval/loss − baseline (mean ± sd) | SE | verdict | l0_frac (mean) |")
    print("|---|---|---|---|---|---|---|---|")
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
            verdict = "baseline" if setting == args.baseline else tax_noise(dict(enumerate(deltas)))["verdict"]
            se = sd / math.sqrt(n)
            print(f"| {size} | {params:,} | {setting} | {n} | {mean:+.4f} ± {sd:.4f} | {se:.4f} | {verdict} "
                  f"| {sum(fracs) / n:.4f} |")
            rows.append((setting, params, mean, tax_noise(dict(enumerate(deltas)))["t_crit"] * se))
    if args.plot:
        plot(rows, args.baseline, args.plot)


def plot(rows, baseline: str, path: Path) -> None:
    """Loss above baseline against parameters, a line per setting, bars +-t(0.975, n-1) SE."""
    import matplotlib  # lazy: only with --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setting in dict.fromkeys(r[0] for r in rows):
        if setting == baseline:
            continue
        pts = [r for r in rows if r[0] == setting]
        ax.errorbar([p[1] for p in pts], [p[2] for p in pts],
                    yerr=[0 if math.isnan(p[3]) else p[3] for p in pts], marker="o", capsize=3, label=setting,
                    linestyle="--" if setting.startswith("topk") else "-")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("eval/loss above the same seed's baseline (nats)")
    ax.set_title("mean over finished seeds, bars +-t(0.975, n-1) SE (none for one seed)", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
