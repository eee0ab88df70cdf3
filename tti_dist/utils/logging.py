"""Logging with a rank prefix.

Every process of a multi-rank job writes to the same terminal; the prefix says which rank
spoke (`[rank 3/4]`). Library code uses `logging.getLogger(__name__)` and never prints.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s [rank {rank}/{world}] %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root `tti_dist` logger once per process, with this rank's prefix.

    The rank is read from the launcher's environment (RANK / WORLD_SIZE), so this can run
    before torch.distributed is initialised.
    """
    rank = os.environ.get("RANK", "0")
    world = os.environ.get("WORLD_SIZE", "1")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank, world=world), "%H:%M:%S"))
    root = logging.getLogger("tti_dist")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
