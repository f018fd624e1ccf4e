"""Putting hshelper into a test build root and running it there as the build user.

The copy mirrors what installing the package does (plugins/ becomes hshelper/plugins,
recipes/ hshelper/recipes), so the build root's own Python runs it with the build root's
own pluggy, sh and tenacity, as inside a real hasher or mock chroot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
BUILD_UID = 65534
HOME = "/home/builder"
WRAPPER = """#!/usr/bin/python3
import sys
sys.path.insert(0, "/opt/hshelper")
from hshelper.cli import {func}
sys.exit({func}())
"""


def install(root: Path, src: Path = SRC) -> None:
    """Copy this checkout's hshelper (or the one at ``src``: the bench compares two)
    into ``root`` (/opt/hshelper + wrappers)."""
    target = root / "opt/hshelper"
    # A private temporary name: test runs in parallel may install into the same root.
    tmp = Path(tempfile.mkdtemp(prefix=".hshelper.", dir=root / "opt"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(src / "hshelper", tmp / "hshelper", ignore=ignore, symlinks=False)
    shutil.copytree(src / "plugins", tmp / "hshelper/plugins", ignore=ignore)
    shutil.copytree(src / "recipes", tmp / "hshelper/recipes", ignore=ignore)
    tmp.chmod(0o755)
    # Byte-compiled as a package install is: the build user cannot write __pycache__
    # there, and compiling hshelper's sources again in every run costs 0.15 s.
    subprocess.run(["chroot", str(root), "python3", "-m", "compileall", "-q", "-d",
                    "/opt/hshelper", f"/opt/{tmp.name}"], check=True)
    old = Path(tempfile.mkdtemp(prefix=".hshelper.old.", dir=root / "opt"))
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, old / "hshelper")
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    for name, func in (("hshelper", "main"), ("helper-run", "helper_run_main")):
        wrapper = root / "usr/local/bin" / name
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(WRAPPER.format(func=func))
        wrapper.chmod(0o755)


@contextlib.contextmanager
def proc_mounted(root: Path):
    """/proc mounted in the root for the duration (hasher mounts it only on request)."""
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(proc)], check=False)


@contextlib.contextmanager
def shm_mounted(root: Path):
    """A tmpfs on /dev/shm in the root for the duration, as mock and sbuild give one."""
    shm = root / "dev/shm"
    shm.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,size=2g", "tmpfs", str(shm)],
                   check=True)
    try:
        yield shm
    finally:
        subprocess.run(["umount", "-l", str(shm)], check=False)


def run(root: Path, argv: list[str], cwd: str = HOME, uid: int = BUILD_UID,
        env: dict[str, str] | None = None, timeout: float = 300, capture: bool = True,
        **kwargs):
    """Run ``argv`` inside ``root`` as ``uid`` with a build user's minimal environment."""
    base = {"HOME": HOME, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "USER": "builder"}
    base.update(env or {})
    cmd = ["chroot", f"--userspec={uid}:{uid}", str(root),
           "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in base.items()],
           "/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv]
    return subprocess.run(cmd, timeout=timeout, capture_output=capture, **kwargs)


def fresh_dir(root: Path, name: str) -> str:
    """A clean directory owned by the build user inside the root; returns its guest path."""
    guest = f"{HOME}/{name}"
    host = root / guest.lstrip("/")
    shutil.rmtree(host, ignore_errors=True)
    host.mkdir(parents=True)
    os.chown(host, BUILD_UID, BUILD_UID)
    return guest
