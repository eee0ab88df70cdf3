"""Writing a small text file so that readers see the old content or the new, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through `path.tmp`, fsync'd, then `os.replace` (atomic on POSIX
    within one directory): a process killed at any point leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
