"""What a failed multi-rank job says about itself: one line naming each failed rank, how it
ended (exit code or signal) and the last line of the exception it raised."""

from __future__ import annotations

from tti_dist.runtime.stop_request import signal_name


def describe_failures(failures: dict) -> str:
    """'rank 1 (pid 4242) was killed by SIGKILL; rank 0 (pid 4241) exited with code 1' from
    torch elastic's {global rank: ProcessFailure}, ranks killed by a signal first (the
    others usually failed because a peer vanished)."""

    def one(rank, failure) -> str:
        code = failure.exitcode
        how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with code {code}"
        reason = failure_reason(failure)
        return f"rank {rank} (pid {failure.pid}) {how}" + (f" ({reason})" if reason else "")

    ordered = sorted(failures.items(), key=lambda item: (item[1].exitcode >= 0, item[0]))
    return "; ".join(one(rank, failure) for rank, failure in ordered)


def failure_reason(failure) -> str:
    """The last line of the exception a failed rank raised ('CollectiveFailure: a collective
    did not complete ...'), from the error file torch elastic's @record wrote; '' if none."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    if not isinstance(message, str) or message.startswith("To enable traceback") or message.startswith("Signal "):
        return ""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
