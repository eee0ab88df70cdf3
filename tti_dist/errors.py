"""User-facing errors, the OS's reason for a failed write, and the exit codes of `tti`.

A `ConfigError` is a mistake in a config file or on the command line. Its message is one
line naming the field path, the value given and what is allowed; the CLI prints it without
a traceback and exits with code 2.
"""

import os

EXIT_RUN_FAILED = 1
"""A run (or a rank of it) failed; its traceback and a one-line summary were printed."""
EXIT_USER_ERROR = 2
"""Bad input, reported in one line before any process started."""
EXIT_STOPPED = 3
"""Stopped by a signal after saving a checkpoint of the last step: `--resume` continues."""


class ConfigError(ValueError):
    """A user error in a config or command line: one line naming field, value and what is allowed."""


class RefusedFileError(ConfigError):
    """A file given to tti (a checkpoint, an SAE) that it will not load: unpickling it would
    call something outside tti's allowlist, or it is not in the format tti writes. One line
    naming the path and why; printed and exited on like any ConfigError."""


class RunWriteError(OSError):
    """A file of a run could not be written (disk full, quota, file size limit, permission):
    one line naming the path and the OS's reason. The previous checkpoint and the metrics
    rows already written stay readable (every write goes to a temporary name first); the
    CLI prints the line and exits with code 1."""


def os_reason(exc: OSError) -> str:
    """The `<reason>` of a `RunWriteError("<path>: could not write ...: <reason>")`:
    '[Errno 28] No space left on device' from an OSError whose text may run on (pyarrow's
    adds 'Error writing bytes to file. Detail: ...'), else its first line."""
    if getattr(exc, "errno", None):
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
