"""The per-run archive: what one run tells the guest, appended to the cached initrd.

The kernel unpacks concatenated cpio archives in order, so a few hundred bytes appended
to the cached image carry the command, its environment, its working directory and the
plugins' per-run steps without touching the cache. Everything is shell text made by pure
functions here, with every value quoted, never interpolated.
"""

from __future__ import annotations

import re
import stat

from hshelper import cpio
from hshelper.model import RunSpec

# Never cross into the guest: preload tricks of the build root (fakeroot, eatmydata),
# and variables that describe the host's session rather than the command's.
DROP_ENV = frozenset({
    "LD_PRELOAD", "LD_LIBRARY_PATH", "FAKEROOTKEY", "FAKED_MODE", "FAKEROOT_FD_BASE",
    "DISPLAY", "XAUTHORITY", "DBUS_SESSION_BUS_ADDRESS", "SSH_AUTH_SOCK", "SSH_AGENT_PID",
    "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "TERM_PROGRAM", "PWD", "OLDPWD", "SHLVL", "_",
})
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def quote(value: str) -> str:
    """Single-quote ``value`` for POSIX sh: the only character to escape is ``'``."""
    return "'" + value.replace("'", "'\\''") + "'"


def guest_env(env: dict[str, str] | tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """The caller's environment as the guest gets it: sorted, dropped names removed,
    names a shell cannot carry removed, and the sbin directories on PATH (build users'
    PATH often lacks them, and that is where mkfs and sfdisk live)."""
    items = dict(env)
    path = [p for p in items.get("PATH", "/usr/bin:/bin").split(":") if p]
    items["PATH"] = ":".join(path + [d for d in SBIN_DIRS if d not in path])
    return sorted((k, v) for k, v in items.items()
                  if k not in DROP_ENV and _NAME.fullmatch(k) and "\0" not in v)


def payload_script(spec: RunSpec) -> str:
    """/hshelper/run/payload.sh: variables for the init and the ``hsh_payload`` function
    that runs the command with exactly the caller's (filtered) environment."""
    env = guest_env(spec.env)
    path = dict(env)["PATH"]
    words = " ".join(quote(f"{k}={v}") for k, v in env)
    args = " ".join(quote(a) for a in spec.argv[1:])
    return (
        f"HSH_CWD={quote(spec.cwd)}\n"
        f"HSH_PATH={quote(path)}\n"
        f"HSH_STDIN={1 if spec.stdin else 0}\n"
        f"hsh_cmd={quote(spec.argv[0])}\n"
        # env -i: the command sees the caller's environment, not the init's.
        # $hsh_guest_env: NAME=VALUE words only the guest knows (disk device paths),
        # added by setup steps; unquoted on purpose, its values contain no blanks.
        # $hsh_enter: set by the init to chroot into the build root (--mode root).
        f'hsh_payload() {{ $hsh_enter env -i {words} $hsh_guest_env "$hsh_cmd" {args}; }}\n'
    )


def setup_script(steps: list[tuple[str, str]]) -> str:
    """/hshelper/run/setup.sh from the plugins' (name, code) steps, in order."""
    parts = []
    for name, code in steps:
        parts.append(f"hsh_step_name={quote(name)}\n{code.rstrip()}\n")
    return "".join(parts)


def run_archive(spec: RunSpec, steps: list[tuple[str, str]], mtime: int = 0) -> bytes:
    """The per-run cpio archive (uncompressed: it is tiny)."""
    mode = stat.S_IFREG | 0o644
    entries = [
        cpio.directory("/hshelper"),
        cpio.directory("/hshelper/run"),
        cpio.Entry("/hshelper/run/payload.sh", mode, payload_script(spec).encode()),
        cpio.Entry("/hshelper/run/setup.sh", mode, setup_script(steps).encode()),
    ]
    return cpio.write_archive(entries, mtime)
