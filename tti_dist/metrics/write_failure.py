"""The OS's reason for a failed metrics write, as one line for a `RunWriteError`.

Both metric sinks (the Parquet table and the TensorBoard events) report a failed write as
`RunWriteError("<path>: could not write ...: <reason>")`; this is the `<reason>`.
"""

from __future__ import annotations

import os


def os_reason(exc: OSError) -> str:
    """'[Errno 28] No space left on device' from an OSError whose text may run on
    (pyarrow's adds 'Error writing bytes to file. Detail: ...')."""
    if exc.errno is not None:
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
