"""Fixtures: real build roots (made by mmdebstrap, cached under /var/tmp) with this
checkout's hshelper installed, ready to run as the build user."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import buildroots  # noqa: E402
import chroot  # noqa: E402
import packages  # noqa: E402

_installed: set[str] = set()


def _root(name: str) -> Path:
    root = buildroots.ensure_root(name)
    if name not in _installed:
        chroot.install(root)
        _installed.add(name)
    return root


@pytest.fixture(scope="session")
def bookworm() -> Path:
    """Debian 12, generic 6.1 kernel (plain .ko, 9p as modules), busybox installed."""
    return _root("bookworm")


@pytest.fixture
def root(bookworm):
    """The bookworm root with /proc mounted for this test only (as hasher mounts it
    when asked: QEMU's 9p server needs it)."""
    with chroot.proc_mounted(bookworm):
        yield bookworm


@pytest.fixture(scope="session")
def root_factory():
    return _root


@pytest.fixture(scope="session")
def debs():
    """python3-hshelper and hshelper .debs built from this checkout's release tarball
    with dpkg-buildpackage (once a session), in a directory every user can read (sbuild
    runs as an unprivileged user)."""
    top = Path(tempfile.mkdtemp(prefix="hshelper-debs.", dir="/var/tmp"))
    top.chmod(0o755)
    try:
        yield packages.build_debs(top / "build")
    finally:
        shutil.rmtree(top, ignore_errors=True)
