"""One door for running the short-lived external programs (zstd, qemu-img, depmod).

It uses ``sh`` (a product dependency) with a clean, explicit environment and no stdin
unless data is given, and turns every failure into an HshelperError that says which case
happened: not found, killed by a signal, or exit N with the program's last stderr line.
The long-running qemu process is supervised by vm.py, not here.
"""

from __future__ import annotations

import io
import os
import subprocess

from hshelper import trace
from hshelper.errors import HshelperError

# Enough of the caller's environment for programs to find themselves and their locale.
_KEEP = ("PATH", "LANG", "LC_ALL", "TMPDIR", "HOME")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _KEEP if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    env.update(extra or {})
    return env


def run(argv: list[str], data: bytes | None = None, hint: str | None = None,
        env: dict[str, str] | None = None) -> bytes:
    """Run ``argv`` to completion and return its stdout as bytes."""
    import sh  # here, not at the top: most runs (cache hits) never need it

    trace.command(argv)
    out, err = io.BytesIO(), io.BytesIO()
    try:
        cmd = sh.Command(argv[0])
    except sh.CommandNotFound as exc:
        raise HshelperError(f"{argv[0]}: command not found", hint=hint) from exc
    try:
        # _tty_out=False: sh gives the program a pty by default, and a build root
        # (hasher, an sbuild chroot) has no /dev/pts: "out of pty devices".
        cmd(*argv[1:], _in=data if data is not None else b"", _out=out, _err=err,
            _env=clean_env(env), _tty_out=False)
    except sh.SignalException as exc:
        raise HshelperError(f"{argv[0]} was killed by a signal", hint=hint) from exc
    except sh.ErrorReturnCode as exc:
        tail = err.getvalue().decode("utf-8", "replace").strip().splitlines()[-1:]
        raise HshelperError(
            f"{argv[0]} failed with exit status {exc.exit_code}"
            + (f": {tail[0]}" if tail else ""), hint=hint) from exc
    return out.getvalue()


def pipe(argv: list[str], data: bytes, hint: str | None = None) -> bytes:
    """Filter ``data`` through ``argv`` (a compressor or decompressor).

    Plain subprocess here, not ``sh``: sh feeds stdin in small chunks through Python,
    which made compressing a 25 MB archive take seconds instead of a tenth of one.
    """
    trace.command(argv, f" <{len(data)} bytes")
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, env=clean_env())
    except FileNotFoundError as exc:
        raise HshelperError(f"{argv[0]}: command not found", hint=hint) from exc
    if proc.returncode < 0:
        raise HshelperError(f"{argv[0]} was killed by a signal", hint=hint)
    if proc.returncode:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise HshelperError(f"{argv[0]} failed with exit status {proc.returncode}"
                            + (f": {tail[0]}" if tail else ""), hint=hint)
    return proc.stdout
