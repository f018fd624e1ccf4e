"""A deterministic writer for the kernel's initramfs format (cpio "newc").

The format is small: per entry a 110-byte ASCII header of 13 fields, the NUL-terminated
name padded to 4 bytes, then the data padded to 4 bytes; a ``TRAILER!!!`` entry ends the
archive. Device nodes are plain headers with a major/minor, so an unprivileged user can
write ``/dev/console`` into an archive without mknod. Entries are sorted and get fixed
owners, times and inode numbers, so the same entries always give the same bytes.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` includes the file type bits (stat.S_IFREG | 0o755).

    ``data`` is the file content, or the link target for a symlink; ``rdev`` is
    (major, minor) for device nodes.
    """

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0

    @property
    def kind(self) -> str:
        return stat.filemode(self.mode)[0]


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def blockdev(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFBLK | perm, rdev=(major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def header(name: str, mode: int, size: int, ino: int, nlink: int, mtime: int,
           rdev: tuple[int, int] = (0, 0), uid: int = 0, gid: int = 0) -> bytes:
    """The one place the 13 newc header fields are written, followed by the padded name."""
    encoded = name.encode() + b"\0"
    fields = (
        ino, mode, uid, gid, nlink, mtime, size,
        0, 0,  # devmajor, devminor of the filesystem the file came from: meaningless here
        rdev[0], rdev[1],
        len(encoded),
        0,  # checksum, only used by the "070702" variant
    )
    head = MAGIC + b"".join(b"%08X" % f for f in fields) + encoded
    return head + _pad(len(head))


def archive_name(path: str) -> str:
    """Archive member names carry no leading slash; the root itself is "."."""
    return path.strip("/") or "."


def iter_archive(entries: Iterable[Entry], mtime: int = 0) -> Iterator[bytes]:
    """Yield the archive in chunks: entries sorted by name so parents precede children."""
    ordered = sorted(entries, key=lambda e: archive_name(e.name))
    seen: set[str] = set()
    for ino, entry in enumerate(ordered, start=1):
        name = archive_name(entry.name)
        if name in seen:
            raise ValueError(f"duplicate archive entry {name!r}")
        seen.add(name)
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        yield header(name, entry.mode, len(entry.data), ino, nlink, mtime,
                     entry.rdev, entry.uid, entry.gid)
        if entry.data:
            yield entry.data
            yield _pad(len(entry.data))
    yield header(TRAILER, 0, 0, 0, 1, 0)


def write_archive(entries: Iterable[Entry], mtime: int = 0) -> bytes:
    """The whole archive as bytes (see :func:`iter_archive`)."""
    return b"".join(iter_archive(entries, mtime))
