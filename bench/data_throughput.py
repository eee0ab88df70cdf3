"""Data-loader throughput: tokens/s that one process reads from memory-mapped Arrow shards.

Measures what the trainer does per micro-step: `DistributedBatchLoader.next_batch()` over
`DatasetWindows` (gather the batch's windows from the mapped shards, cast to int64, wrap as
a torch tensor), single-threaded. The dataset is built first (byte-level stdlib by default)
unless --dataset names an existing one; the page cache is warmed by one untimed epoch
fraction, so the figure is the loader's cost, not the disk's.

    python bench/data_throughput.py [--dataset DIR] [--max-bytes N] [--seq-len T]
                                    [--micro-batch B] [--dp-size N] [--batches N] [--columns]

Prints a table and a one-line JSON summary (record it in docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", help="existing dataset directory (default: build stdlib byte-level)")
    parser.add_argument("--max-bytes", type=int, default=32_000_000, help="bytes of stdlib to build (default 32M)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--dp-size", type=int, default=1, help="simulate DP rank 0 of this many")
    parser.add_argument("--batches", type=int, default=2000, help="timed micro-batches")
    parser.add_argument("--columns", action="store_true", help="also gather every extra per-token column")
    args = parser.parse_args()

    torch.set_num_threads(1)
    from tti_dist.data.dataset_reader import open_dataset
    from tti_dist.data.build import build_dataset
    from tti_dist.data.loader import DatasetWindows, DistributedBatchLoader

    with tempfile.TemporaryDirectory(prefix="tti-bench-data-") as tmp:
        path = args.dataset
        build_s = None
        if path is None:
            path = str(Path(tmp) / "stdlib")
            t0 = time.perf_counter()
            build_dataset("stdlib", path, tokenizer="byte", max_bytes=args.max_bytes, val_fraction=0.01)
            build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dataset = open_dataset(path, verify=True)
        open_s = time.perf_counter() - t0
        windows = DatasetWindows({s: dataset.split_shards(s) for s in ("train", "val")}, args.seq_len)
        loader = DistributedBatchLoader(windows, "train", args.micro_batch, 0, args.dp_size, seed=0)
        columns = tuple(windows.column_names) if args.columns else ()

        def read() -> torch.Tensor:
            return loader.next_batch_columns(columns)["tokens"] if columns else loader.next_batch()

        for _ in range(min(200, loader.batches_per_epoch)):  # warm the page cache and code paths
            read()
        t0 = time.perf_counter()
        checksum = 0
        for _ in range(args.batches):
            checksum += int(read()[0, 0])  # touch the result so nothing is optimised away
        elapsed = time.perf_counter() - t0

    tokens = args.batches * args.micro_batch * (args.seq_len + 1)
    summary = {
        "bench": "data_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "dataset": "stdlib byte" if args.dataset is None else args.dataset,
        "train_tokens": dataset.num_tokens("train"),
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "dp_size": args.dp_size,
        "columns": list(columns), "batches": args.batches,
        "tokens_per_s": round(tokens / elapsed),
        "batches_per_s": round(args.batches / elapsed, 1),
        "build_s": None if build_s is None else round(build_s, 2),
        "open_verify_s": round(open_s, 3),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    print(f"{'tokens/s (one process)':28s}{summary['tokens_per_s']:,}")
    print(f"{'micro-batches/s':28s}{summary['batches_per_s']:,}")
    print(f"{'batch':28s}{args.micro_batch} x {args.seq_len + 1} tokens, dp rank 0 of {args.dp_size}")
    print(f"{'open + sha256 verify':28s}{open_s:.3f} s for {dataset.num_tokens('train'):,} train tokens")
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
