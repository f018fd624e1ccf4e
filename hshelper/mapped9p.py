"""Root's view of a shared directory: owners, modes and device nodes kept in xattrs.

QEMU's 9p server runs as the build user, who cannot chown or mknod on the host. With
``security_model=mapped-xattr`` it records what the guest's root asked for in the
file's ``user.virtfs.*`` extended attributes instead (uid, gid, mode, rdev), and shows
the guest those: ``tar -x --numeric-owner`` into the working directory, device nodes,
setuid bits and ``mkfs.ext4 -d ./rootfs`` work in the guest as on a root-owned local
filesystem.

The price on the host: QEMU creates files with one fixed mode, keeps later ``chmod``s
in the xattrs only, and stores a symlink as a regular file holding its target. So after
each run :func:`settle` walks the share and makes the host's view ordinary again: each
file and directory the guest created or changed gets the permission bits the guest
gave it (:func:`host_mode`: without setuid and setgid, which on the host would make
the build user's files run as the build user for anyone, and always readable and
writable by their owner, so a later run, whose QEMU opens them as the build user, and
the build user's own cleanup still can), each symlink becomes a real symlink. Owners
stay the build user's on the host (the guest still sees its own owners, from the
xattrs, in this run and later ones); device nodes, FIFOs and sockets stay empty files
with their xattrs (only root could make real ones).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

MODE = "user.virtfs.mode"
# The msize of every 9p mount (the working directory's, the build root's). QEMU reports
# a file's st_blksize as the largest read that fits in one message: msize less the
# 24-byte header, rounded down to 4 KiB. 256 KiB + 4 KiB makes that exactly 256 KiB;
# with msize=256 KiB it was 258048, and programs that align their I/O to st_blksize
# (cryptsetup reading a LUKS header from an image file) failed with EIO.
MSIZE = 256 * 1024 + 4096


def supported(directory: Path) -> bool:
    """Whether files in ``directory`` can carry user xattrs (tmpfs before Linux 6.6
    cannot): probed on a private temporary file, removed at once."""
    try:
        import tempfile  # rarely needed; with random, 1.3 ms of every start

        fd, name = tempfile.mkstemp(prefix=".hshelper-xattr-", dir=directory)
    except OSError:
        return False
    try:
        os.setxattr(fd, "user.hshelper.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)


def mode_of(value: bytes) -> int:
    """QEMU's user.virtfs.mode value: a little-endian mode_t."""
    return int.from_bytes(value[:4], "little")


def host_mode(mode: int) -> int:
    """The permission bits the host gets for a file or directory the guest gave ``mode``
    (a full st_mode): the guest's, less setuid and setgid, plus read and write (and, for
    a directory, search) for the owner."""
    owner = 0o700 if stat.S_ISDIR(mode) else 0o600
    return (stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID)) | owner


@dataclass
class Settled:
    """What :func:`settle` changed."""

    modes: int = 0
    symlinks: int = 0
    errors: int = 0


def _settle_one(path: str, st: os.stat_result, result: Settled) -> None:
    try:
        value = os.getxattr(path, MODE, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            result.errors += 1
        return
    mode = mode_of(value)
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK and stat.S_ISREG(st.st_mode):
        target = Path(path).read_bytes()
        tmp = f"{path}.hshelper-link"
        os.symlink(target, tmp)
        os.replace(tmp, path)
        result.symlinks += 1
    elif kind in (stat.S_IFREG, stat.S_IFDIR) and stat.S_IMODE(st.st_mode) != \
            host_mode(mode):
        os.chmod(path, host_mode(mode))
        result.modes += 1


def settle(root: Path, since: float) -> Settled:
    """Make the host's view of a mapped share ordinary for what changed since ``since``
    (a time.time()): see the module docstring."""
    result = Settled()
    changed_after = since - 2  # coarse timestamps
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*filenames, *dirnames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if st.st_ctime >= changed_after:
                    _settle_one(path, st, result)
            except OSError:
                result.errors += 1
    with contextlib.suppress(OSError):
        st = os.lstat(root)
        if st.st_ctime >= changed_after:
            _settle_one(str(root), st, result)
    return result
