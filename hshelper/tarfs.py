"""A root filesystem tarball as the entries of an ext4 filesystem built on the host.

Pure functions. ``mke2fs -d DIR`` writes a filesystem from a directory natively and
unprivileged, but the files of a tarball unpacked by the build user belong to the build
user, device nodes cannot be made, and security xattrs cannot be set. So the tarball's
own metadata is kept here as :class:`Entry` values and turned into a ``debugfs`` script
that writes it into the new filesystem: owners, modes (setuid included), device nodes,
FIFOs and xattrs. What such a script cannot say exactly is reported by
:func:`unsupported`, and the caller then leaves the tarball to GNU tar in the guest.
"""

from __future__ import annotations

import dataclasses
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

XATTR_PREFIX = "SCHILY.xattr."
ACL_PREFIX = "SCHILY.acl."
TYPE_BITS = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK,
             "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}
# Made by debugfs, not on the host (the build user cannot make device nodes).
SPECIAL = ("chr", "blk", "fifo")


class UnsafeMember(ValueError):
    """A member name that would land outside the tree (``..``)."""


@dataclass(frozen=True)
class Entry:
    """One tar member as the filesystem must hold it."""

    path: str  # relative, normalised, "" for the root directory
    kind: str  # dir, file, symlink, hardlink, chr, blk, fifo
    mode: int  # permission bits (07777)
    uid: int
    gid: int
    mtime: float
    target: str = ""  # symlink: its text; hardlink: the normalised path it names
    major: int = 0
    minor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    acl: bool = False  # POSIX ACLs recorded (not representable here)
    size: int = 0  # a regular file's bytes


def normalize(name: str) -> str:
    """A member name as a path relative to the root: no leading ``/`` or ``./``.

    Raises :class:`UnsafeMember` for ``..`` components, which GNU tar refuses too.
    """
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeMember(f"member {name!r} has a '..' component")
    return "/".join(parts)


def kind_of(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr():
        return "chr"
    if info.isblk():
        return "blk"
    if info.isfifo():
        return "fifo"
    return "file"  # regular, contiguous, sparse


def entry_of(info: tarfile.TarInfo) -> Entry:
    """The :class:`Entry` of a tar member (owners numeric, as ``tar --numeric-owner``)."""
    kind = kind_of(info)
    xattrs = tuple(
        (key[len(XATTR_PREFIX):], value.encode("utf-8", "surrogateescape"))
        for key, value in sorted(info.pax_headers.items()) if key.startswith(XATTR_PREFIX))
    acl = any(key.startswith(ACL_PREFIX) for key in info.pax_headers) or any(
        name.startswith("system.posix_acl") for name, _ in xattrs)
    target = ""
    if kind == "symlink":
        target = info.linkname
    elif kind == "hardlink":
        target = normalize(info.linkname)
    return Entry(normalize(info.name), kind, info.mode & 0o7777, info.uid, info.gid,
                 float(info.mtime), target, info.devmajor, info.devminor, xattrs, acl,
                 info.size if kind == "file" else 0)


def unsupported(entry: Entry, seen: dict[str, Entry]) -> str | None:
    """Why ``entry`` cannot be written exactly by the host path, or None.

    ``seen`` holds the entries so far by path (for hard link targets and for symlinks
    among a path's parents).
    """
    if any(c in entry.path for c in "\n\r\0"):
        return f"{entry.path!r}: a newline in a name (debugfs reads one command a line)"
    if entry.acl:
        return f"{entry.path}: POSIX ACLs"
    parts = entry.path.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent in seen and seen[parent].kind != "dir":
            return (f"{entry.path}: its parent {parent} is a {seen[parent].kind}, "
                    "not a directory")
    if entry.path == "" and entry.kind != "dir":
        return "the root member is not a directory"
    if entry.kind == "hardlink" and (entry.target not in seen
                                     or seen[entry.target].kind != "file"):
        what = seen[entry.target].kind if entry.target in seen else "missing"
        return f"{entry.path}: a hard link to {entry.target or '/'} ({what})"
    return None


class Tree:
    """The entries of a tarball as they are read, member after member.

    A later member of the same path replaces the earlier one, as with tar. Parents that
    no member names are directories as GNU tar makes them for root: 0755, root-owned,
    dated now. With ``epoch`` (a reproducible image) "now" is the epoch, and every
    modification time later than it is clamped to it.
    """

    def __init__(self, now: float, epoch: int | None = None) -> None:
        self.now = now if epoch is None else epoch
        self.epoch = epoch
        self.entries: dict[str, Entry] = {"": Entry("", "dir", 0o755, 0, 0, self.now)}

    def clamped(self, entry: Entry) -> Entry:
        """``entry`` with its modification time clamped to the epoch, if there is one."""
        if self.epoch is None or entry.mtime <= self.epoch:
            return entry
        return dataclasses.replace(entry, mtime=float(self.epoch))

    def times(self, entry: Entry) -> tuple[float, float]:
        """(access, modification) times the unpacked copy gets (mke2fs -d copies them):
        the access time is the epoch of a reproducible image."""
        return (entry.mtime if self.epoch is None else self.epoch, entry.mtime)

    def finish(self) -> None:
        """Entries the filesystem has whatever the tarball says: mkfs's lost+found,
        root-owned as mkfs run by root makes it (mke2fs run by the build user gives
        it to the build user)."""
        self.entries.setdefault("lost+found", Entry("lost+found", "dir", 0o700, 0, 0,
                                                    self.now))

    def add(self, entry: Entry) -> list[str]:
        """Record ``entry``; return the implicit parent directories it needs first."""
        parents = []
        parts = entry.path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = Entry(parent, "dir", 0o755, 0, 0, self.now)
                parents.append(parent)
        self.entries[entry.path] = entry
        return parents


def _quote(text: str) -> str:
    # debugfs's parser keeps a quoted word whole and reads "" inside it as one quote.
    return '"' + text.replace('"', '""') + '"'


def debugfs_path(path: str) -> str:
    """A relative path as debugfs's absolute one, quoted."""
    return _quote("/" + path) if path else "/"


def host_mode(entry: Entry) -> int:
    """The permission bits the unpacked copy gets on the host (mke2fs -d copies them).

    As close to the real ones as the build user can keep: its own read (and, for a
    directory, search and write) bits are forced, so that mke2fs can read everything.
    """
    return entry.mode | (0o700 if entry.kind == "dir" else 0o400)


def debugfs_script(entries: Iterable[Entry], value_file: dict[tuple[str, str], str],
                   owner: tuple[int, int], epoch: int | None = None) -> str:
    """debugfs commands that give the filesystem the entries' metadata.

    ``entries`` are the final ones (one per path; hard links are skipped, their target
    carries the inode's metadata). Device nodes and FIFOs are made here; everything
    else is already in the filesystem, owned by ``owner`` (uid, gid) with the
    :func:`host_mode` bits, so only what differs is written. ``value_file`` names the
    file holding each ``(path, xattr name)``'s value, written by the caller. With
    ``epoch`` (a reproducible image) every inode's change time becomes the epoch
    (mke2fs -d copies the unpacked copy's, the time of unpacking).
    """
    by_dir: dict[str, list[Entry]] = {}
    for e in entries:
        if e.kind != "hardlink":
            by_dir.setdefault(e.path.rpartition("/")[0], []).append(e)
    lines: list[str] = []
    # Names relative to the current directory: one lookup a command instead of a walk
    # from / (a third of debugfs's time for a Debian root).
    for parent in sorted(by_dir):
        lines.append(f"cd {debugfs_path(parent)}")
        for e in by_dir[parent]:
            name = _quote(e.path.rpartition("/")[2]) if e.path else "/"
            root = not e.path  # mke2fs -d leaves the root directory as it makes it
            if e.kind in SPECIAL:
                node = "p" if e.kind == "fifo" else f"{e.kind[0]} {e.major} {e.minor}"
                lines.append(f"mknod {name} {node}")
                lines.append(f"sif {name} mtime @{int(e.mtime)}")
            if root or e.uid != owner[0]:
                lines.append(f"sif {name} uid {e.uid}")
            if root or e.gid != owner[1]:
                lines.append(f"sif {name} gid {e.gid}")
            if epoch is not None:
                lines.append(f"sif {name} ctime @{epoch}")
            if root or e.kind in SPECIAL or (e.kind != "symlink"
                                             and e.mode != host_mode(e)):
                lines.append(f"sif {name} mode 0{TYPE_BITS[e.kind] | e.mode:o}")
            for attr, _value in e.xattrs:
                lines.append(f"ea_set -f {_quote(value_file[(e.path, attr)])} {name} "
                             f"{_quote(attr)}")
    return "\n".join(lines) + "\n"
