"""The run script: what one run tells the guest, sent once the guest says "ready".

The cached image holds nothing that differs from run to run; the command, its
environment, its working directory and the plugins' per-run steps reach the booted
guest over the control port (hshelper.guestabi), so a VM saved at "ready" can be
restored for any run. Everything is shell text made by pure functions here, with every
value quoted, never interpolated.
"""

from __future__ import annotations

import re

from hshelper.guestabi import APPLET_DIR
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
    path += [d for d in SBIN_DIRS if d not in path]
    # busybox's applets stand in for programs the build root lacks, so they come last.
    items["PATH"] = ":".join([d for d in path if d != APPLET_DIR] + [APPLET_DIR])
    return sorted((k, v) for k, v in items.items()
                  if k not in DROP_ENV and _NAME.fullmatch(k) and "\0" not in v)


def fstab_escape(field: str) -> str:
    """A field as fstab writes it: blanks and backslashes as octal escapes (getmntent,
    which both busybox's and util-linux's mount read fstab with, decodes them)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in field)


def fstab(entries: list[tuple[str, str, str, str]]) -> str:
    """fstab lines for (what, where, type, options)."""
    return "".join(" ".join(map(fstab_escape, entry)) + " 0 0\n" for entry in entries)


def write_and_mount(name: str, text: str) -> list[str]:
    """Shell lines: write ``text`` to /hshelper/run/fstab.NAME (with the shell's own
    printf: no program start) and mount all of it with one mount program (under TCG
    every program start costs tens of milliseconds)."""
    path = f"/hshelper/run/fstab.{name}"
    return [f"printf '%s' {quote(text)} >{path}", f"$hsh_mount -a -T {path}"]


def payload_script(spec: RunSpec) -> str:
    """Variables for the init and the ``hsh_payload`` function that runs the command
    with exactly the caller's (filtered) environment."""
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


def setup_function(steps: list[tuple[str, str]]) -> str:
    """``hsh_setup``: the plugins' (name, code) steps, in order, as one function."""
    parts = ["hsh_setup() {\n:\n"]
    for name, code in steps:
        parts.append(f"hsh_step_name={quote(name)}\n{code.rstrip()}\n")
    parts.append("}\n")
    return "".join(parts)


def run_script(spec: RunSpec, steps: list[tuple[str, str]]) -> bytes:
    """The whole run script the host sends after "ready"."""
    return (payload_script(spec) + setup_function(steps)).encode()
