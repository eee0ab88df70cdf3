"""Single-node launcher: spawn N local ranks with torch's elastic agent (torchrun's engine).

This is the single-node smoke-test path (CPU with gloo, or the GPUs of one machine with
NCCL). The agent runs a c10d rendezvous on a free loopback port, sets RANK / LOCAL_RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT for each child, and fails the whole job if any rank
fails, reporting which one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import uuid

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from tti_dist.distributed.groups import single_process_env
from tti_dist.utils.environ import environ_set

logger = logging.getLogger(__name__)


def launch_ranks(entry, nproc: int, *args, name: str = "tti", grace_s: int = 30) -> dict:
    """Run `entry(*args)` on `nproc` local ranks; returns {rank: result}.

    One rank runs in-process with a real size-1 process group (no agent, no extra
    process); more ranks run under torch's elastic agent (spawned children, c10d rendezvous
    on a free loopback port, the whole job failing when one rank fails). `entry` and
    `args` must be picklable. Used by `tti train`, `tti sae fit`, `tti eval`, `tti inspect`.

    Faults (docs/reliability.md): when a rank dies the agent sends the others SIGTERM and,
    `grace_s` seconds later, SIGKILL, then raises ChildFailedError naming the failed ranks.
    A SIGTERM/SIGINT/SIGHUP to this process is forwarded the same way (the ranks get
    `grace_s` seconds to save) and raises torch's SignalException after they are gone.
    """
    if nproc == 1:
        with single_process_env():
            return {0: entry(*args)}
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"{name}-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        shutdown_timeout=grace_s,
    )
    with _signals_forwarded_once():
        return elastic_launch(config, entry)(*args)


@contextlib.contextmanager
def _signals_forwarded_once():
    """SIGTERM/SIGINT to this process: torch's agent behaviour (raise its SignalException,
    forward the signal to the ranks, give them `shutdown_timeout` to exit), but a second
    signal while the ranks are saving is ignored. torch's own handler raises again, which
    would abandon the wait and leave the ranks running unwatched."""
    signalled = []

    def handler(signum, frame):
        if signalled:
            logger.warning("received %s again; waiting for the ranks to finish saving", signal.Signals(signum).name)
            return
        signalled.append(signum)
        raise SignalException(f"Process {os.getpid()} got signal: {signal.Signals(signum).name}",
                              sigval=signal.Signals(signum))

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # The agent installs its handler for the signals listed here when it starts the ranks.
        with environ_set({_AGENT_SIGNALS_ENV: "SIGHUP,SIGQUIT"}):
            yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_AGENT_SIGNALS_ENV = "TORCHELASTIC_SIGNALS_TO_HANDLE"
