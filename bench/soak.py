"""Soak: a long run of a small model, checking that per-step cost and memory stay flat.

Runs `tti train` (the real command, one process per rank under the elastic launcher) for
`--steps` optimizer steps (default 20,000) of a small GPT with `logging.log_every: 1`, so
every step writes TensorBoard and Parquet rows, plus periodic evaluation and checkpoints.
It then reads the run's own metrics table and compares two windows of `--window` steps
(default 1,000): the first after `--warmup` steps (default 500) and the last:

- step time: median `perf/step_time_s` (which includes the metrics writes and any flush);
- resident memory: median `perf/rss_gib` (the maximum over ranks of their RSS at that step).

The goal is last / first within 10% for both. Any cost that grows with the number of steps
(a table rewritten whole, a list that is never trimmed, an ever-growing autograd graph)
shows up as a ratio above it, and as a positive trend: the bench also fits a line through
the medians of all consecutive windows and reports its slope with a standard error, which
single windows on a shared machine (+-15%) cannot fake. Prints a summary and a JSON line.

    python bench/soak.py --out /tmp/soak                  # 20,000 steps (~10 min on 2 cores)
    python bench/soak.py --out /tmp/soak --steps 3000 --window 500   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.max_seq_len=64",
         "data.seq_len=64", "train.micro_batch_size=4", "data.max_bytes=2000000"]


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys on xs and its standard error (nan with fewer than 3 points)."""
    n = len(xs)
    if n < 3:
        return float("nan"), float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return slope, (resid / (n - 2) / sxx) ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory to create (must not hold a run)")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--window", type=int, default=1_000)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (TP=nproc)")
    parser.add_argument("--eval-every", type=int, default=2_000)
    parser.add_argument("--checkpoint-every", type=int, default=2_000)
    parser.add_argument("--analyze-only", action="store_true",
                        help="read the metrics of an existing soak run at --out instead of training")
    args = parser.parse_args(argv)
    if args.warmup + 2 * args.window > args.steps:
        parser.error("--steps must be at least --warmup + 2 x --window")
    run_dir = Path(args.out)
    tti = str(Path(sys.executable).with_name("tti"))
    sets = MODEL + [f"train.steps={args.steps}", f"parallel.tp_size={args.nproc}", "parallel.dp_size=1",
                    "logging.log_every=1", "logging.progress_bar=false", "optim.warmup_steps=50",
                    f"train.eval_every={args.eval_every}", "train.eval_batches=2",
                    f"checkpoint.every={args.checkpoint_every}", "checkpoint.keep_last=2"]
    cmd = [tti, "train", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run_dir), "--nproc", str(args.nproc)]
    for s in sets:
        cmd += ["--set", s]
    load_before = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    if not args.analyze_only:
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if code != 0:
            raise SystemExit(f"tti train exited {code}; see {run_dir.parent / (run_dir.name + '.log')}")
    wall = time.perf_counter() - start

    from tti_dist.metrics import read_metrics

    table = read_metrics(run_dir).to_pydict()
    rows = dict(zip(table["step"], zip(table["perf/step_time_s"], table["perf/rss_gib"])))
    first = range(args.warmup + 1, args.warmup + args.window + 1)
    last = range(args.steps - args.window + 1, args.steps + 1)

    def window(steps: range, i: int) -> float:
        return statistics.median(rows[s][i] for s in steps)

    summary = {
        "bench": "soak", "date": date.today().isoformat(), "steps": args.steps, "rows": len(table["step"]),
        "nproc": args.nproc, "window": args.window, "warmup": args.warmup,
        "first_window": [first.start, first.stop - 1], "last_window": [last.start, last.stop - 1],
        "step_time_first_ms": round(1000 * window(first, 0), 3), "step_time_last_ms": round(1000 * window(last, 0), 3),
        "rss_first_gib": round(window(first, 1), 4), "rss_last_gib": round(window(last, 1), 4),
        "wall_s": round(wall, 1), "loadavg_1m": [load_before, round(os.getloadavg()[0], 2)],
        "command": "python bench/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    # The trend over the whole run, not just its two ends: medians of consecutive windows
    # and their least-squares slope with its standard error. On a shared machine single
    # windows move by +-15% with other load; a cost that grows with the step count shows
    # as a slope many standard errors above 0.
    starts = list(range(args.warmup + 1, args.steps - args.window + 2, args.window))
    medians = [window(range(s0, s0 + args.window), 0) * 1000 for s0 in starts]
    rss_medians = [window(range(s0, s0 + args.window), 1) for s0 in starts]
    slope, slope_se = _slope([s0 + args.window / 2 for s0 in starts], medians)
    rss_slope, rss_slope_se = _slope([s0 + args.window / 2 for s0 in starts], rss_medians)
    summary["window_step_time_ms"] = [round(m, 2) for m in medians]
    summary["step_time_slope_ms_per_10k_steps"] = [round(1e4 * slope, 3), round(1e4 * slope_se, 3)]
    summary["rss_slope_gib_per_10k_steps"] = [round(1e4 * rss_slope, 5), round(1e4 * rss_slope_se, 5)]
    summary["step_time_ratio"] = round(summary["step_time_last_ms"] / summary["step_time_first_ms"], 3)
    summary["rss_ratio"] = round(summary["rss_last_gib"] / summary["rss_first_gib"], 3)
    print(f"steps {args.steps} ({summary['rows']} metric rows), {wall:.0f} s")
    print(f"median step time: steps {first.start}-{first.stop - 1}: {summary['step_time_first_ms']} ms, "
          f"steps {last.start}-{last.stop - 1}: {summary['step_time_last_ms']} ms, ratio {summary['step_time_ratio']}")
    print(f"median RSS (max over ranks): {summary['rss_first_gib']} GiB -> {summary['rss_last_gib']} GiB, "
          f"ratio {summary['rss_ratio']}")
    print("median step time per window of %d steps (ms): %s" % (args.window, " ".join(
        f"{m:.1f}" for m in medians)))
    print(f"trend: {summary['step_time_slope_ms_per_10k_steps'][0]} +- "
          f"{summary['step_time_slope_ms_per_10k_steps'][1]} ms per 10,000 steps; RSS "
          f"{summary['rss_slope_gib_per_10k_steps'][0]} +- {summary['rss_slope_gib_per_10k_steps'][1]} GiB per 10,000 steps")
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
