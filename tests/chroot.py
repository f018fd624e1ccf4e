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
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
# Settings given to the test process that every hshelper run in the suite takes.
SUITE_SWITCHES = ("HSHELPER_RUN_SAVED_STATES",)
BUILD_UID = 65534
HOME = "/home/builder"
WRAPPER = """#!/usr/bin/python3
import sys
sys.path.insert(0, "/opt/hshelper")
from hshelper.cli import {func}
sys.exit({func}())
"""


def stage(tmp: Path, src: Path = SRC) -> None:
    """The package as installed (plugins/ becomes hshelper/plugins, recipes/
    hshelper/recipes) in the directory ``tmp``, readable by everyone; from this checkout
    or the one at ``src`` (the bench compares two)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(src / "hshelper", tmp / "hshelper", ignore=ignore, symlinks=False)
    shutil.copytree(src / "plugins", tmp / "hshelper/plugins", ignore=ignore)
    shutil.copytree(src / "recipes", tmp / "hshelper/recipes", ignore=ignore)
    tmp.chmod(0o755)


def install(root: Path, src: Path = SRC) -> None:
    """Copy this checkout's hshelper (or the one at ``src``) into ``root``
    (/opt/hshelper + wrappers)."""
    target = root / "opt/hshelper"
    # A private temporary name: test runs in parallel may install into the same root.
    (root / "opt").mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hshelper.", dir=root / "opt"))
    stage(tmp, src)
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
    install_integrations(root)


def install_integrations(root: Path) -> None:
    """integrations/ at /usr/share/hshelper/integrations, where the packages put it."""
    target = root / "usr/share/hshelper/integrations"
    tmp = Path(tempfile.mkdtemp(prefix=".integrations.", dir=root / "opt"))
    shutil.copytree(SRC / "integrations", tmp / "integrations",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp / "integrations", target)
    shutil.rmtree(tmp, ignore_errors=True)


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
    """Run ``argv`` inside ``root`` as ``uid`` with a build user's minimal environment
    (plus the switches of the whole suite: HSHELPER_RUN_SAVED_STATES=0 runs every VM
    test booting cold)."""
    base = {"HOME": HOME, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "USER": "builder"}
    base.update({k: v for k, v in os.environ.items() if k in SUITE_SWITCHES})
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


def qemu_pids(root: Path) -> set[int]:
    """qemu processes running inside ``root`` (any architecture's qemu-system)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                exe = os.readlink(f"/proc/{entry}/exe")
                where = os.readlink(f"/proc/{entry}/root")
            except OSError:
                continue
            if "qemu-system-" in os.path.basename(exe) and str(root) in where:
                pids.add(int(entry))
    return pids


def wait_no_qemu(root: Path, seconds: float = 10) -> bool:
    """Whether every qemu in ``root`` is gone within ``seconds``."""
    deadline = time.monotonic() + seconds
    while qemu_pids(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not qemu_pids(root)


def host_install(where: Path) -> Path:
    """This checkout's hshelper staged in ``where`` for the host's own python3 (Debian's
    python3-pluggy, -sh, -tenacity), so it runs unprivileged on the host: the tests'
    virtualenv lives under /root, which the build user cannot enter."""
    target = where / "hshelper-host"
    tmp = Path(tempfile.mkdtemp(prefix=".hshelper-host.", dir=where))
    stage(tmp)
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", "-d", str(target),
                    str(tmp)], check=True)
    old = Path(tempfile.mkdtemp(prefix=".hshelper-host.old.", dir=where))
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, old / "x")
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def run_host(staged: Path, command: str, argv: list[str], cwd: Path, home: Path,
             timeout: float = 600, uid: int = BUILD_UID) -> subprocess.CompletedProcess:
    """``hshelper``/``helper-run`` on the host as ``uid`` (not root), from ``staged``."""
    func = "main" if command == "hshelper" else "helper_run_main"
    code = f"import sys; sys.path.insert(0, {str(staged)!r}); " \
           f"from hshelper.cli import {func}; sys.exit({func}())"
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "XDG_CACHE_HOME": str(home / ".cache"),
           **{k: v for k, v in os.environ.items() if k in SUITE_SWITCHES}}
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           "/usr/bin/python3", "-c", code, *argv], cwd=cwd, env=env,
                          capture_output=True, timeout=timeout)
