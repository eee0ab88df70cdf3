"""Per-sink cost of one `MetricsWriter.log()` on the writing rank: 30 float tags per call,
each sink alone (none, TensorBoard, Parquet, W&B offline) and all three together.

For each configuration: the time to open the writer (for W&B: importing wandb and starting
its service process), the wall and CPU time (process_time, this process only: W&B's
service process works in the background and is not counted) per `log()` call over N
calls, and the time to close it (W&B: flushing its offline run file).

    python bench/sink_per_log.py [N]      # default N = 2000

Prints one line per configuration (record it in docs/performance.md). Asserts nothing.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tti_dist.config.schema import WandbConfig
from tti_dist.metrics import MetricsWriter

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
TAGS = [f"train/tag{i:02d}" for i in range(30)]


def bench(name: str, **sinks) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        writer = MetricsWriter(Path(tmp) / "run", **sinks)
        t1, c1 = time.perf_counter(), time.process_time()
        for step in range(1, N + 1):
            writer.log(step, step * 1024, {t: 1.0 / (step + i) for i, t in enumerate(TAGS)})
        t2, c2 = time.perf_counter(), time.process_time()
        writer.close()
        t3 = time.perf_counter()
    print(f"{name:<16} open {t1 - t0:6.2f} s   log {1e3 * (t2 - t1) / N:6.3f} ms/call "
          f"(CPU {1e3 * (c2 - c1) / N:6.3f} ms)   close {t3 - t2:6.2f} s", flush=True)


if __name__ == "__main__":
    wandb = WandbConfig(project="bench", mode="offline")
    bench("none", tensorboard=False, parquet=False)
    bench("tensorboard", tensorboard=True, parquet=False)
    bench("parquet", tensorboard=False, parquet=True)
    bench("wandb offline", tensorboard=False, parquet=False, wandb=wandb)
    bench("all three", tensorboard=True, parquet=True, wandb=wandb)
