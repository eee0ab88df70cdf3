"""This process's memory, for `perf/*` metrics and benchmarks.

Resident set size (RSS) is what the operating system holds for the process in RAM: the
figure that decides whether a node runs out of memory. Read from /proc (Linux), which costs
one small read and no host-device sync; elsewhere the current figure is unavailable (None)
and the peak comes from getrusage.
"""

from __future__ import annotations

import os
import resource
import sys

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int | None:
    """Resident set size now (second field of /proc/self/statm, in pages), or None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """Largest resident set size this process has had (getrusage's ru_maxrss: KiB on Linux,
    bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
