"""Starting qemu so that it can never outlive hshelper, and stopping it.

qemu gets its own process group (a terminal's Ctrl-C reaches hshelper, which decides),
dies with its parent (PR_SET_PDEATHSIG: even a SIGKILL of hshelper takes qemu along),
inherits exactly the descriptors named, and has its stderr read by the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess

from hshelper import trace
from hshelper.errors import HshelperError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: list[str], pass_fds: list[int]) -> subprocess.Popen:
    """Start qemu: stdin and stdout closed, stderr a pipe for the caller."""
    trace.command(argv)
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, pass_fds=pass_fds,
                                preexec_fn=_die_with_parent, start_new_session=True)
    except OSError as exc:
        raise HshelperError(f"cannot start {argv[0]}: {exc.strerror}") from exc


def kill(proc: subprocess.Popen | None) -> None:
    """SIGKILL qemu's whole process group (nothing in a guest needs a clean stop: every
    result is written by the guest before it reports its status) and reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
