"""hshelper.mapped9p: the host's view of a share QEMU served with mapped xattrs, made
ordinary after a run (no VM: files laid out as QEMU's mapped-xattr model leaves them)."""

from __future__ import annotations

import os
import stat
import time

import pytest

from hshelper import mapped9p


def test_host_mode_drops_setuid_and_keeps_the_owner_in():
    assert mapped9p.host_mode(stat.S_IFREG | 0o4755) == 0o755
    assert mapped9p.host_mode(stat.S_IFREG | 0o2711) == 0o711
    assert mapped9p.host_mode(stat.S_IFREG | 0o000) == 0o600
    assert mapped9p.host_mode(stat.S_IFREG | 0o444) == 0o644
    assert mapped9p.host_mode(stat.S_IFDIR | 0o2775) == 0o775
    assert mapped9p.host_mode(stat.S_IFDIR | 0o1777) == 0o1777
    assert mapped9p.host_mode(stat.S_IFDIR | 0o000) == 0o700


def qemu_file(path, mode: int, data: bytes = b"") -> None:
    """A file as QEMU's mapped-xattr model makes it: host mode 0644, the guest's mode
    (and owner) in user.virtfs.* xattrs."""
    path.write_bytes(data)
    path.chmod(0o644)
    os.setxattr(path, "user.virtfs.mode", mode.to_bytes(4, "little"))
    os.setxattr(path, "user.virtfs.uid", (0).to_bytes(4, "little"))


def test_settle_makes_modes_and_symlinks_ordinary(tmp_path):
    if not mapped9p.supported(tmp_path):
        pytest.skip(f"{tmp_path} cannot hold user xattrs")
    since = time.time()
    qemu_file(tmp_path / "passwd", stat.S_IFREG | 0o4711, b"#!/bin/sh\n")
    qemu_file(tmp_path / "shadow", stat.S_IFREG | 0o000, b"root:*:\n")
    qemu_file(tmp_path / "null", stat.S_IFCHR | 0o666)
    qemu_file(tmp_path / "bin", stat.S_IFLNK | 0o777, b"usr/bin")
    (tmp_path / "home").mkdir()
    os.setxattr(tmp_path / "home", "user.virtfs.mode",
                (stat.S_IFDIR | 0o700).to_bytes(4, "little"))
    untouched = tmp_path / "plain"
    untouched.write_text("the build user's own file\n")
    untouched.chmod(0o640)

    result = mapped9p.settle(tmp_path, since)
    assert (result.modes, result.symlinks, result.errors) == (3, 1, 0)
    assert stat.S_IMODE((tmp_path / "passwd").stat().st_mode) == 0o711
    assert stat.S_IMODE((tmp_path / "shadow").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700
    assert os.readlink(tmp_path / "bin") == "usr/bin"
    # A device node stays an empty file (only root could make a real one).
    assert stat.S_ISREG((tmp_path / "null").lstat().st_mode)
    assert stat.S_IMODE(untouched.stat().st_mode) == 0o640
