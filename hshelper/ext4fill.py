"""Build a populated ext4 filesystem inside an image file, natively on the host.

Per-file work is what a TCG guest does worst (about 10 s for a 100 MB root tree, where
the host needs well under one): so hshelper can write the root filesystem of an image
here, unprivileged, with the build root's own e2fsprogs, and leave the steps that need
root (mounting, bootloaders) to the VM. A directory goes to ``mke2fs -d`` as it is; a
tarball is unpacked by the build user into a private directory first, and its owners,
modes, device nodes and xattrs are then written by ``debugfs`` (see
:mod:`hshelper.tarfs`), so the result is what GNU tar run as root would have made.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hshelper import tarfs
from hshelper.errors import HshelperError

# Python's tarfile reads these itself; zstd goes through the zstd program.
TAR_MODES = {"tar": "r:", "gzip": "r:gz", "bzip2": "r:bz2", "xz": "r:xz", "zstd": "r|"}
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
         b"(\xb5/\xfd": "zstd"}


class Unsupported(Exception):
    """The source holds something the host path cannot write exactly; use the guest."""


@dataclass(frozen=True)
class Ext4:
    """Where and how to make the filesystem.

    ``epoch`` makes it reproducible: e2fsprogs' times are the epoch, the directory hash
    seed is ``hash_seed``, the inode tables are written now (not by the kernel's lazy
    init at the first mount), and there is no journal yet: the recipe adds a fresh one
    after the kernel's writes, whose journal would depend on their timing."""

    image: Path
    offset: int  # bytes
    size: int  # bytes
    label: str
    uuid: str
    features: tuple[str, ...] = ()  # mke2fs -O words, e.g. "^64bit"
    hash_seed: str = ""
    epoch: int | None = None

    def env(self) -> dict[str, str] | None:
        if self.epoch is None:
            return None
        return {**os.environ, "E2FSPROGS_FAKE_TIME": str(self.epoch)}


def find_tool(name: str) -> str | None:
    """A program of the build root: PATH, then the sbin directories a build user's
    PATH usually lacks (sfdisk, mke2fs and debugfs live there)."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def source_kind(path: Path) -> str | None:
    """"dir", a tar kind of :data:`TAR_MODES`, or None (not a root tree we know)."""
    if path.is_dir():
        return "dir"
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        head = fh.read(512)
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    return "tar" if head[257:262] == b"ustar" else None


def _run(argv: list[str], what: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    program = find_tool(argv[0])
    if program is None:
        raise HshelperError(f"{argv[0]} not found", hint="install e2fsprogs in the build "
                            "root")
    proc = subprocess.run([program, *argv[1:]], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        # One line: the reason ends the run (mke2fs says it in a few).
        said = "; ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
        raise HshelperError(f"{what} failed: {argv[0]}: {said}", status=1)
    return proc


def mke2fs_argv(fs: Ext4, tree: Path) -> list[str]:
    extended = f"offset={fs.offset}"
    features = list(fs.features)
    if fs.epoch is not None:
        extended += f",hash_seed={fs.hash_seed},lazy_itable_init=0"
        features.insert(0, "^has_journal")
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", fs.label, "-U", fs.uuid,
            "-E", extended, "-d", str(tree)]
    if features:
        argv += ["-O", ",".join(features)]
    return [*argv, str(fs.image), f"{fs.size // 1024}k"]


def mke2fs(fs: Ext4, tree: Path) -> None:
    _run(mke2fs_argv(fs, tree), "making the root filesystem", fs.env())


def debugfs(fs: Ext4, script: Path) -> None:
    # debugfs reports a failed command on stderr and still exits 0: anything there
    # but its version banner is a failure.
    proc = _run(["debugfs", "-w", "-f", str(script), f"{fs.image}?offset={fs.offset}"],
                "writing owners and modes", fs.env())
    errors = [line for line in proc.stderr.splitlines()
              if line.strip() and not line.startswith("debugfs ")]
    if errors:
        raise HshelperError("writing owners and modes failed: debugfs: "
                            + "; ".join(errors[:5]), status=1)


def _open_tar(path: Path, kind: str) -> tuple[tarfile.TarFile, subprocess.Popen | None]:
    if kind != "zstd":
        return tarfile.open(path, TAR_MODES[kind]), None
    zstd = find_tool("zstd")
    if zstd is None:
        raise Unsupported("a zstd tarball and no zstd program on the host")
    proc = subprocess.Popen([zstd, "-dcq", str(path)], stdout=subprocess.PIPE)
    return tarfile.open(fileobj=proc.stdout, mode=TAR_MODES[kind]), proc


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _entries(tf: tarfile.TarFile, state: tarfs.Tree):
    """(member, entry, earlier entry of its path) for each member, checked; raises
    :class:`Unsupported` for what the host path cannot represent."""
    for info in tf:
        try:
            entry = tarfs.entry_of(info)
        except tarfs.UnsafeMember as err:
            raise Unsupported(str(err)) from None
        reason = tarfs.unsupported(entry, state.entries)
        if reason:
            raise Unsupported(reason)
        yield info, entry, state.entries.get(entry.path) if entry.path else None


@dataclass(frozen=True)
class Usage:
    """What a root tree asks of a filesystem, as far as its listing tells."""

    sizes: tuple[int, ...]  # of its regular files, each inode once
    dirs: int
    entries: int


def scan(path: Path, kind: str, check: bool = True) -> Usage:
    """Read the tarball's headers only and check every member (see :func:`unpack`),
    so that a fill started later cannot meet an :class:`Unsupported` member halfway
    (``check=False``: only read). Returns what the tree needs."""
    state = tarfs.Tree(time.time())
    tf, proc = _open_tar(path, kind)
    count = 0
    try:
        with tf:
            members = _entries(tf, state) if check else (
                (info, tarfs.entry_of(info), None) for info in tf)
            for _info, entry, _earlier in members:
                state.add(entry)
                count += 1
    except tarfs.UnsafeMember as err:
        raise Unsupported(str(err)) from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise HshelperError(f"cannot read {path}: {err}", status=1) from None
    finally:
        _close(proc, path)
    entries = state.entries.values()
    return Usage(tuple(e.size for e in entries if e.kind == "file"),
                 sum(e.kind == "dir" for e in entries), count)


def dir_usage(top: Path) -> Usage:
    """:class:`Usage` of a directory tree, as the build user sees it."""
    sizes: dict[tuple[int, int], int] = {}
    dirs = entries = 0
    for dirpath, dirnames, filenames in os.walk(top):
        dirs += 1
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                sizes[(st.st_dev, st.st_ino)] = st.st_size
    return Usage(tuple(sizes.values()), dirs, entries)


def journal_blocks(blocks: int) -> int:
    """The journal mke2fs makes for a filesystem of ``blocks`` blocks (its defaults)."""
    for limit, size in ((32768, 1024), (256 << 10, 4096), (512 << 10, 8192),
                        (4096 << 10, 16384), (8192 << 10, 32768), (16384 << 10, 65536),
                        (32768 << 10, 131072)):
        if blocks < limit:
            return size
    return 262144


def room_problem(usage: Usage, size: int) -> str | None:
    """Why ``usage`` cannot fit an ext4 filesystem of ``size`` bytes made with mke2fs's
    defaults, or None. A lower bound of what mke2fs needs: the files' and directories'
    blocks, the inode tables and the journal (not the bitmaps, descriptors, extent
    blocks or directory growth), so that only what surely cannot fit is refused."""
    small = size < 512 << 20  # mke2fs.conf's "small": 1 KiB blocks, an inode per 4 KiB
    block, ratio = (1024, 4096) if small else (4096, 16384)
    data = sum(-(-n // block) for n in usage.sizes) * block + usage.dirs * block
    need = data + size // ratio * 256 + journal_blocks(size // block) * block
    if need <= size:
        return None
    mib = 1 << 20
    return (f"the root tree ({data // mib} MiB in {usage.entries} entries) needs at least "
            f"{-(-need // mib)} MiB of ext4, more than the {size // mib} MiB root partition")


def _close(proc: subprocess.Popen | None, path: Path) -> None:
    if proc:
        proc.stdout.close()
        if proc.wait() != 0 and proc.returncode != -13:  # SIGPIPE: we stopped reading
            raise HshelperError(f"zstd could not decompress {path}", status=1)


def unpack(path: Path, kind: str, tree: Path, values: Path,
           epoch: int | None = None) -> tuple[tarfs.Tree, dict[tuple[str, str], str]]:
    """Unpack the tarball's files, directories, symlinks and hard links into ``tree``.

    Everything is made readable and writable by the build user (mke2fs must read it, and
    the real modes come later); device nodes and FIFOs are only recorded. xattr values
    go to files in ``values``. Raises :class:`Unsupported` for what the host path
    cannot represent. Returns the entries and the value file of each (path, xattr).
    ``epoch``: a reproducible image's (see :class:`tarfs.Tree`).
    """
    state = tarfs.Tree(time.time(), epoch)
    files: dict[tuple[str, str], str] = {}
    tf, proc = _open_tar(path, kind)
    try:
        with tf:
            for info, read, earlier in _entries(tf, state):
                entry = state.clamped(read)
                for parent in state.add(entry):
                    (tree / parent).mkdir(mode=0o700)
                dest = tree / entry.path
                if earlier and not (earlier.kind == entry.kind == "dir"):
                    _remove(dest)  # a later member replaces an earlier one
                _make(tf, info, entry, tree, dest, state.times(entry))
                for name, value in entry.xattrs:
                    files[(entry.path, name)] = str(values / str(len(files)))
                    Path(files[(entry.path, name)]).write_bytes(value)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise HshelperError(f"cannot unpack {path}: {err}", status=1) from None
    finally:
        _close(proc, path)
    return state, files


def _make(tf: tarfile.TarFile, info: tarfile.TarInfo, entry: tarfs.Entry, tree: Path,
          dest: Path, times: tuple[float, float]) -> None:
    if entry.kind == "dir":
        dest.mkdir(mode=0o700, exist_ok=True)
    elif entry.kind == "file":
        # Raw descriptors: per-call overhead is most of the cost for small files.
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            src = tf.extractfile(info)
            while src is not None and (chunk := src.read(1 << 20)):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fchmod(fd, tarfs.host_mode(entry))
            os.utime(fd, times)
        finally:
            os.close(fd)
        return
    elif entry.kind == "symlink":
        os.symlink(entry.target, dest)
    elif entry.kind == "hardlink":
        os.link(tree / entry.target, dest)
        return  # the target's times are the inode's
    else:
        return  # device nodes and FIFOs: debugfs makes them
    os.utime(dest, times, follow_symlinks=False)


def _finish_dirs(state: tarfs.Tree, tree: Path) -> None:
    # Last, innermost first: making the entries inside a directory touches its mtime,
    # and a directory's own bits may forbid writing into it.
    for path in sorted((p for p, e in state.entries.items() if e.kind == "dir"),
                       key=lambda p: -p.count("/") if p else 1):
        entry = state.entries[path]
        where = tree / path if path else tree
        os.chmod(where, tarfs.host_mode(entry))
        os.utime(where, state.times(entry))


def scratch_dir(need: int, fallback: Path) -> Path:
    """Where to unpack a tree of about ``need`` bytes.

    A tmpfs (``/dev/shm``) when it has room to spare: unpacking thousands of files
    there is several times faster than on a disk filesystem, and the tree lives only
    for the seconds mke2fs reads it. Else ``fallback`` (the image's directory).
    """
    for candidate in (os.environ.get("HSHELPER_SCRATCH"), "/dev/shm"):
        if not candidate or not os.path.isdir(candidate) or not os.access(candidate, os.W_OK):
            continue
        st = os.statvfs(candidate)
        if st.f_bavail * st.f_frsize > 4 * need:
            return Path(candidate)
    return fallback


def dir_stamp_script(top: Path, epoch: int) -> str:
    """debugfs commands that date what mke2fs -d copied from the directory ``top`` for a
    reproducible image: change and access times the epoch, modification times clamped
    to it."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for name in ([""] if rel == "." else []) + dirnames + filenames:
            path = os.path.normpath(os.path.join(rel, name)) if name else ""
            path = "" if path == "." else path
            if any(c in path for c in "\n\r"):
                raise HshelperError(f"{top}: {path!r} has a newline in its name, which a "
                                    "reproducible image cannot be stamped for", status=1)
            quoted = tarfs.debugfs_path(path)
            lines += [f"sif {quoted} ctime @{epoch}", f"sif {quoted} atime @{epoch}"]
            mtime = os.lstat(os.path.join(top, path) if path else top).st_mtime
            if mtime > epoch:
                lines.append(f"sif {quoted} mtime @{epoch}")
    return "\n".join(lines) + "\n"


def fill(source: Path, fs: Ext4, scratch: Path, kind: str | None = None) -> str:
    """Make ``fs`` in its image from ``source`` (a directory or a tarball).

    ``kind`` is :func:`source_kind`'s answer when the caller has it already.
    ``scratch`` is the directory to unpack into when no tmpfs has room (the image's
    own directory: the image is as large). Returns what was done, for -v.
    Raises :class:`Unsupported` (nothing written yet that matters: the caller falls
    back to the guest) or :class:`HshelperError`.
    """
    kind = kind or source_kind(source)
    if kind is None:
        raise Unsupported(f"{source} is neither a directory nor a tar archive")
    if kind == "dir":
        # A directory is taken as the build user sees it, like cp -a over the share.
        mke2fs(fs, source)
        if fs.epoch is None:
            return f"mke2fs -d {source}"
        with tempfile.NamedTemporaryFile("w", prefix=".hshelper-stamp-", dir=scratch,
                                         errors="surrogateescape") as script:
            script.write(dir_stamp_script(source, fs.epoch))
            script.flush()
            debugfs(fs, Path(script.name))
        return f"mke2fs -d {source}, times by debugfs"
    # A compressed tarball is guessed to unpack to four times its size.
    need = source.stat().st_size * (1 if kind == "tar" else 4)
    where = scratch_dir(need, scratch)
    work = Path(tempfile.mkdtemp(prefix=".hshelper-fill-", dir=where))
    try:
        tree, values = work / "tree", work / "values"
        tree.mkdir(mode=0o700)
        values.mkdir()
        state, files = unpack(source, kind, tree, values, fs.epoch)
        _finish_dirs(state, tree)
        state.finish()
        script = work / "debugfs.cmds"
        script.write_text(tarfs.debugfs_script(state.entries.values(), files,
                                                (os.getuid(), os.getgid()), fs.epoch),
                          errors="surrogateescape")
        mke2fs(fs, tree)
        debugfs(fs, script)
        return (f"{len(state.entries)} entries of {source} unpacked in {where}, "
                "mke2fs -d, owners and modes by debugfs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
