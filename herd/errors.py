"""HerdError: the one exception type for bad user input.

Its message is one sentence that names the problem and the fix. The `herd` command prints it as
`herd: error: <message>` and exits with status 2, never with a stack trace.
"""


class HerdError(Exception):
    """Bad input from the user (missing file, wrong shape, unknown name, ...), with the fix in the message."""


class ConfigError(HerdError, ValueError):
    """An impossible configuration (e.g. heads that do not divide the width); also a ValueError for library callers."""
