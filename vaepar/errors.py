"""The errors users see: each is printed as one line, without a traceback."""


class VaeparError(Exception):
    """A problem with the user's input or environment (exit code 1)."""


class OptionError(VaeparError, ValueError):
    """A bad, conflicting or ignored command-line option (exit code 2, like a usage error).

    Configs raise it from ``__post_init__``; it is a ``ValueError`` so that library callers can
    catch it as one.
    """


class InternalError(Exception):
    """Something vaepar did not expect: a bug, reported as one line plus, with ``--debug``, the
    traceback (exit code 3)."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback
