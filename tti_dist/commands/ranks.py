"""Launch a multi-rank job from a command and report a failure in one line.

The pattern every rank-running verb shares: prepare (in this process) -> `launch_ranks`
(one rank in-process, more under torch's elastic agent) -> each rank opens a session and
runs its part -> the launcher gathers {rank: result}.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from tti_dist.errors import EXIT_RUN_FAILED
from tti_dist.runtime.failures import describe_failures
from tti_dist.runtime.launcher import launch_ranks
from tti_dist.runtime.session import quiet_dependency_warnings, run_in_session


def run_on_ranks(what: str, nproc: int, fn, *args) -> tuple[dict | None, int | None]:
    """`fn(*args)` on `nproc` local ranks: ({rank: result}, None), or (None, exit code) after
    one line naming the failed ranks (each printed its traceback already)."""
    quiet_dependency_warnings()
    try:
        return launch_ranks(fn, nproc, *args, name=f"tti-{what.replace(' ', '-')}"), None
    except ChildFailedError as exc:
        print(f"tti: {what} failed: {describe_failures(exc.failures)}", file=sys.stderr)
        return None, EXIT_RUN_FAILED


def run_in_rank_sessions(what: str, nproc: int, cfg, tp_size: int, ep_size: int | None, fn, *args):
    """`fn(*args, groups)` on `nproc` ranks, each inside a rank session of TP degree
    `tp_size` (expert-parallel degree `ep_size` for MoE models); as `run_on_ranks`."""
    return run_on_ranks(what, nproc, run_in_session, cfg, tp_size, ep_size, fn, *args)
