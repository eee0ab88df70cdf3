"""User-facing errors.

A `ConfigError` is a mistake in a config file or on the command line. Its message is one
line naming the field path, the value given and what is allowed; the CLI prints it without
a traceback and exits with code 2 (DESIGN.md section 5.6).
"""


class ConfigError(ValueError):
    """A user error in a config or command line: one line naming field, value and what is allowed."""


class RefusedFileError(ConfigError):
    """A file given to tti (a checkpoint, an SAE) that it will not load: unpickling it would
    call something outside tti's allowlist, or it is not in the format tti writes. One line
    naming the path and why; printed and exited on like any ConfigError."""
