"""The two kinds of failure (STYLE: "Config, CLI, errors").

UserError: the input is wrong (a path, a flag, a checkpoint, an artifact). The CLIs print its one-line
message and exit with code 2, no traceback. InternalError: an invariant of ours broke; it carries
context and is a bug to report.
"""

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input, explained in one line."""


class InternalError(RuntimeError):
    """A broken invariant inside ernie-compile."""
