"""Metrics sink cost: milliseconds per `MetricsWriter.log()` early and late in a run.

The writer logs one row per step with --tags float scalars (30, as a training run with a
few regularizers logs), flushing every --flush-every calls as the trainer does. A window
of --window consecutive `log()` calls is timed starting near step 1,000 and near step
100,000 (--near); the window contains its flushes, so the figure is the amortised cost of
one call, flush share included. The default window is eight parts' worth of rows
(8 x rows_per_part): the tail part's size, and so the flush cost, cycles with a period of
rows_per_part calls, and a whole number of cycles makes the two windows comparable
wherever they start (eight rather than one, so that a window lasts ~0.5 s and scheduler
noise on a shared machine averages out). Each
window is timed in --repeats fresh runs; the median is reported, wall and CPU time
(process_time; less disturbed by other processes on a shared machine).

Only the Parquet sink is timed unless --tensorboard is given (TensorBoard's cost per call
does not depend on the run length, and would only dilute the comparison).

With --old (default on; --no-old skips it) it also times the writer as it was before the
parts format, loaded from git (commit OLD_COMMIT), which rewrote the whole table on every
flush. Reaching step 100,000 by logging would take it about a quarter of an hour, so its
runs are started by resuming from a table of near-1 rows written directly; its window is
--old-window calls (it has no part cycle).

    python bench/metrics_sink.py [--near 1000 100000] [--tags 30] [--flush-every 20]
                                 [--rows-per-part 512] [--window N] [--repeats 3]
                                 [--tensorboard] [--no-old] [--old-window 200]

Prints a table and a one-line JSON summary (record it in docs/performance.md). Asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tti_dist.metrics import MetricsWriter, metrics_path  # noqa: E402
from tti_dist.metrics.parquet_sink import DEFAULT_ROWS_PER_PART  # noqa: E402

# The last commit whose MetricsWriter rewrote the whole metrics.parquet on every flush.
OLD_COMMIT = "3da7626"


def cpu_name() -> str:
    """CPU model (from /proc/cpuinfo on Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_mb() -> float:
    """Resident memory of this process (Linux /proc), MB; nan elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def scalars_for(step: int, tags: list[str], rng: np.random.Generator) -> dict[str, float]:
    return dict(zip(tags, rng.random(len(tags)).tolist()))


def time_window(writer, first_step: int, num_calls: int, tags, rng) -> tuple[float, float]:
    """(wall ms, CPU ms) per log() over num_calls consecutive steps from first_step."""
    batches = [scalars_for(s, tags, rng) for s in range(first_step, first_step + num_calls)]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i, values in enumerate(batches):
        step = first_step + i
        writer.log(step, step * 1024, values)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall / num_calls * 1e3, cpu / num_calls * 1e3


def run_new(args, tags) -> dict:
    """One fresh run of the current writer from step 1 past the last window."""
    rng = np.random.default_rng(0)
    out: dict = {"wall": {}, "cpu": {}, "rss_mb": {}}
    with tempfile.TemporaryDirectory(prefix="tti-bench-metrics-") as tmp:
        writer = MetricsWriter(
            tmp, tensorboard=args.tensorboard, flush_every=args.flush_every,
            rows_per_part=args.rows_per_part,
        )
        step = 1
        for near in sorted(args.near):
            while step < near:  # untimed: just get there
                writer.log(step, step * 1024, scalars_for(step, tags, rng))
                step += 1
            out["rss_mb"][near] = rss_mb()
            wall, cpu = time_window(writer, step, args.window, tags, rng)
            out["wall"][near], out["cpu"][near] = wall, cpu
            step += args.window
        writer.close()
        out["steps"] = step - 1
        path = metrics_path(tmp)
        out["files"] = len(list(path.iterdir()))
        t0 = time.perf_counter()
        out["rows_read"] = pq.read_table(path).num_rows
        out["read_s"] = time.perf_counter() - t0
    return out


def load_old_sinks() -> types.ModuleType | None:
    """The sinks module of OLD_COMMIT, or None when git or the commit is unavailable."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "show", f"{OLD_COMMIT}:tti_dist/metrics/sinks.py"],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("old_sinks")
    exec(compile(source, f"{OLD_COMMIT}:tti_dist/metrics/sinks.py", "exec"), module.__dict__)
    return module


def run_old(old, args, tags, near: int) -> tuple[float, float]:
    """The old writer resumed from a table of near-1 rows, timed over --old-window calls."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="tti-bench-metrics-old-") as tmp:
        steps = np.arange(1, near, dtype=np.int64)
        columns = {"step": pa.array(steps), "tokens": pa.array(steps * 1024)}
        for tag in tags:
            columns[tag] = pa.array(rng.random(len(steps)))
        pq.write_table(pa.table(columns), Path(tmp) / old.PARQUET_NAME)
        writer = old.MetricsWriter(
            tmp, tensorboard=args.tensorboard, flush_every=args.flush_every, resume_step=near - 1
        )
        result = time_window(writer, near, args.old_window, tags, rng)
        writer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--near", type=int, nargs=2, default=[1_000, 100_000],
                        help="steps where the windows start")
    parser.add_argument("--tags", type=int, default=30, help="float scalars per log() call")
    parser.add_argument("--flush-every", type=int, default=20,
                        help="MetricsWriter flush_every (the trainer's default, 20)")
    parser.add_argument("--rows-per-part", type=int, default=DEFAULT_ROWS_PER_PART)
    parser.add_argument("--window", type=int,
                        help="timed log() calls per window (default 8 x rows-per-part)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh runs; the median is reported")
    parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    parser.add_argument("--old", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also time the whole-table writer of commit {OLD_COMMIT}")
    parser.add_argument("--old-window", type=int, default=200,
                        help="timed log() calls per window, old writer")
    args = parser.parse_args()
    args.window = args.window or 8 * args.rows_per_part
    lo, hi = sorted(args.near)
    tags = [f"train/metric_{i:02d}" for i in range(args.tags)]

    load_before = round(os.getloadavg()[0], 2)
    new_runs = [run_new(args, tags) for _ in range(args.repeats)]
    old = load_old_sinks() if args.old else None
    old_runs = {}
    if old is not None:
        old_runs = {n: [run_old(old, args, tags, n) for _ in range(args.repeats)] for n in (lo, hi)}
    load_after = round(os.getloadavg()[0], 2)

    median = statistics.median
    new = {kind: {n: median(r[kind][n] for r in new_runs) for n in (lo, hi)} for kind in ("wall", "cpu")}
    rows = [("current (parts)", n, new["wall"][n], new["cpu"][n]) for n in (lo, hi)]
    old_med = {}
    if old_runs:
        for i, kind in enumerate(("wall", "cpu")):
            old_med[kind] = {n: median(r[i] for r in old_runs[n]) for n in (lo, hi)}
        rows += [(f"old ({OLD_COMMIT}, whole table)", n, old_med["wall"][n], old_med["cpu"][n]) for n in (lo, hi)]

    print(f"MetricsWriter.log(): {args.tags} tags/step, flush_every={args.flush_every}, "
          f"rows_per_part={args.rows_per_part}, tensorboard={args.tensorboard}, median of {args.repeats} runs")
    print(f"{'writer':<32} {'near step':>10} {'window':>7} {'wall ms/log':>12} {'cpu ms/log':>11}")
    for name, near, wall, cpu in rows:
        window = args.old_window if name.startswith("old") else args.window
        print(f"{name:<32} {near:>10,} {window:>7} {wall:>12.3f} {cpu:>11.3f}")
    ratio = new["wall"][hi] / new["wall"][lo]
    cpu_ratio = new["cpu"][hi] / new["cpu"][lo]
    print(f"current: ratio step {hi:,} / step {lo:,} = {ratio:.2f} wall, {cpu_ratio:.2f} cpu")
    if old_med:
        old_ratio = old_med["wall"][hi] / old_med["wall"][lo]
        print(f"old:     ratio step {hi:,} / step {lo:,} = {old_ratio:.2f} wall")
    elif args.old:
        print(f"old: not run (git show {OLD_COMMIT} failed)")
    last = new_runs[-1]
    print(f"current, after {last['steps']:,} steps: {last['files']} files in metrics.parquet/, "
          f"pq.read_table {last['read_s']:.2f} s for {last['rows_read']:,} rows; "
          f"RSS {last['rss_mb'][lo]:.0f} MB at step {lo:,}, {last['rss_mb'][hi]:.0f} MB at step {hi:,}")
    print(f"load average (1 min): {load_before} before, {load_after} after")

    summary = {
        "bench": "metrics_sink",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "command": shlex.join(["python", *sys.argv]),
        "tags": args.tags, "flush_every": args.flush_every, "rows_per_part": args.rows_per_part,
        "window": args.window, "repeats": args.repeats, "tensorboard": args.tensorboard,
        "ms_per_log": {str(n): round(new["wall"][n], 4) for n in (lo, hi)},
        "cpu_ms_per_log": {str(n): round(new["cpu"][n], 4) for n in (lo, hi)},
        "ratio": round(ratio, 3), "cpu_ratio": round(cpu_ratio, 3),
        "old_ms_per_log": {str(n): round(old_med["wall"][n], 3) for n in (lo, hi)} if old_med else None,
        "old_window": args.old_window if old_med else None,
        "files": last["files"], "read_s": round(last["read_s"], 3),
        "loadavg_1m": [load_before, load_after],
    }
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
