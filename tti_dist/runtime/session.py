"""One rank's session: logging, device, dependency notices, CPU threads, the process groups,
and their teardown whatever happens; and the one-line reason for a collective that failed
because a peer stopped answering.

Every command that runs ranks (train, eval, sae fit, inspect) and Ray trials open the same
session, so a rank is set up identically whichever launched it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

from tti_dist.config.schema import RunConfig
from tti_dist.distributed.groups import ParallelGroups, init_parallel, resolve_device, shutdown_parallel
from tti_dist.utils.logging import setup_logging


def quiet_dependency_warnings(device: torch.device | None = None) -> None:
    """Silence dependency notices that do not apply to this run, once per rank.

    - megatron-core recommends CUDA_DEVICE_MAX_CONNECTIONS=1 for async TP all-reduce; on
      CPU there is no CUDA (on GPU the worker sets the variable instead).
    - torch deprecates all_gather_into_tensor, which DeepSpeed ZeRO calls; not ours to fix.
    """
    if device is None or device.type == "cpu":
        warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.* is deprecated")


def set_cpu_threads(device: torch.device) -> None:
    """Split the machine's cores between the local ranks (intra-op threads), unless the user
    set OMP_NUM_THREADS: then that count, as for any torch program (e.g. two runs sharing a
    machine, or Ray's per-worker setting)."""
    if device.type != "cpu":
        return
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        torch.set_num_threads(int(explicit))
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))


@contextlib.contextmanager
def rank_session(cfg: RunConfig, tp_size: int, ep_size: int | None = None) -> Iterator[ParallelGroups]:
    """One rank's setup and teardown, shared by train, eval, sae fit and inspect: logging,
    device, dependency notices, CPU threads, the process groups (TP degree `tp_size`;
    expert-parallel degree `ep_size` for MoE models), and their teardown whatever happens."""
    setup_logging(cfg.logging.level)
    device = resolve_device(cfg.train.device)
    quiet_dependency_warnings(device)
    if device.type == "cuda":
        # Megatron's TP layers overlap their all-reduce with compute only when kernels are
        # queued in issue order on one hardware queue.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    set_cpu_threads(device)
    groups = init_parallel(tp_size, device, cfg.train.dist_timeout_s, ep_size)
    try:
        yield groups
    finally:
        shutdown_parallel()


class CollectiveFailure(RuntimeError):
    """A collective failed because a peer rank stopped answering or vanished."""


def explain_collective_failure(exc: RuntimeError, timeout_s: int) -> CollectiveFailure | None:
    """The one-line reason for a failed gloo/NCCL collective, or None for other errors.

    The backends' own messages name a source line and a transport buffer; the launcher
    prints this instead, as the failed rank's reason."""
    text = str(exc)
    # gloo: "[...transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv ...";
    # NCCL's watchdog: "Watchdog caught collective operation timeout: ...".
    if "Timed out waiting" in text or "collective operation timeout" in text:
        return CollectiveFailure(
            f"a collective did not complete within train.dist_timeout_s = {timeout_s} s: a peer rank stopped "
            "responding (hung, stopped or unreachable)")
    if "Connection closed by peer" in text or "Connection reset by peer" in text or "Broken pipe" in text:
        return CollectiveFailure("a peer rank vanished during a collective (its process died)")
    return None


def run_in_session(cfg: RunConfig, tp_size: int, ep_size: int | None, fn, *args):
    """`fn(*args, groups)` inside `rank_session(cfg, tp_size, ep_size)`: the per-rank entry
    of eval, sae fit and inspect (top level, so that spawned ranks can unpickle it)."""
    with rank_session(cfg, tp_size, ep_size) as groups:
        return fn(*args, groups)
