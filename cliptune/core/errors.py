"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class CliptuneError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""

    exit_code = 2


class InterruptedRun(CliptuneError):
    """Training was interrupted (Ctrl-C) after a checkpoint was saved."""

    exit_code = 130
