"""The error hshelper's library code raises; only cli.py turns it into an exit status."""

from __future__ import annotations

# Exit statuses, following docker/podman: the guest command's own 0-255 pass through.
EXIT_USAGE = 2  # the command line itself is wrong (argparse's own status)
EXIT_TIMEOUT = 124
EXIT_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class HshelperError(Exception):
    """A failure of hshelper itself or of its VM, with a one-line reason.

    ``status`` is the exit status the CLI uses; ``hint`` says what to install or change.
    """

    def __init__(self, message: str, status: int = EXIT_FAILED, hint: str | None = None):
        super().__init__(message)
        self.status = status
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.hint})" if self.hint else text
