"""Run a function on N real gloo ranks (torch.multiprocessing, spawn) and collect results.

Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in its environment, so the product's
own `init_parallel` starts the process group exactly as under the launcher. A rank's
return value is saved with torch.save and returned to the test in rank order; an exception
in any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        torch.save({"ok": fn(*args)}, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        raise


def run_ranks(world_size: int, fn, *args) -> list:
    """fn(*args) on `world_size` ranks; returns the per-rank results."""
    with tempfile.TemporaryDirectory(prefix="tti-spawn-") as out_dir:
        try:
            mp.start_processes(_entry, args=(world_size, get_free_port(), out_dir, fn, args),
                               nprocs=world_size, join=True, start_method="spawn")
        except mp.ProcessRaisedException:
            pass  # the rank's traceback is in its result file
        results = []
        for rank in range(world_size):
            f = Path(out_dir) / f"rank{rank}.pt"
            if not f.exists():
                raise RuntimeError(f"rank {rank} died without a result")
            payload = torch.load(f, weights_only=False)
            if "error" in payload:
                raise RuntimeError(f"rank {rank} failed:\n{payload['error']}")
            results.append(payload["ok"])
        return results
