"""The cache directory: where it is, what lives in it, and checked entries.

One table (:data:`SUBDIRS`) names every part of the cache, so ``hshelper clean`` and
``hshelper info`` see all of it. Files that a run boots from (the initrd and its
uncompressed twin, the unpacked kernel, saved VM states) and the small ones that steer
it (plan memos, KVM probe answers) are written with a record of their size, CRC-32 and
stamp beside them (``NAME.sum``) and checked against it before use: a truncated or
damaged entry (a full disk, a crash of an older version, a write by something else) is
discarded and made again instead of failing every later run. CRC-32 because it is the
cheapest digest the standard library has (3.4 GB/s here against 1.1 GB/s for SHA-256):
it guards against damage, not against someone who can write the cache anyway. Damage
that writes nothing (a bad sector) shows when the file is read: an image that does not
boot is removed then.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

from hshelper.atomic import write_atomic
from hshelper.errors import HshelperError

SUBDIRS = {
    "images": "helper initrds, one directory per content key",
    "plans": "warm-path memos: which image a set of inputs last made",
    "kernels": "kernels unpacked for qemu (PVH vmlinux, zboot payloads)",
    "modindex": "module metadata read from kernels without modules.dep",
    "probe": "KVM probe answers, valid for one boot of the machine",
    "states": "saved VM states to restore instead of booting",
    "logs": "kernel console logs of failed runs (the last few)",
}
CHUNK = 1 << 20


def root(config) -> Path:
    """The cache directory: configured, else XDG, else a private one in /var/tmp or /tmp
    (a build user's HOME is often missing or read-only)."""
    configured = config.get("image", "cache_dir")
    candidates = [Path(configured)] if configured else []
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = os.environ.get("HOME")
    if xdg:
        candidates.append(Path(xdg) / "hshelper")
    if home:
        candidates.append(Path(home) / ".cache" / "hshelper")
    for tmp in (os.environ.get("TMPDIR"), "/var/tmp", "/tmp"):
        if tmp:
            candidates.append(Path(tmp) / f"hshelper-cache-{os.getuid()}")
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            continue
        if os.access(path, os.W_OK | os.X_OK) and path.stat().st_uid == os.getuid():
            return path
    raise HshelperError("no writable cache directory",
                        hint="set HSHELPER_IMAGE_CACHE_DIR or [image] cache_dir")


def subdir(config, name: str) -> Path:
    """``root/name``, made when missing; ``name`` must be one of :data:`SUBDIRS`."""
    if name not in SUBDIRS:
        raise ValueError(f"unknown cache part {name}")
    path = root(config) / name
    path.mkdir(exist_ok=True)
    return path


def sizes(base: Path) -> dict[str, int]:
    """Bytes each part of the cache under ``base`` takes on disk (a saved state's RAM
    file is mostly holes)."""
    out = {}
    for name in SUBDIRS:
        total = 0
        for dirpath, _, files in os.walk(base / name):
            for file in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, file)).st_blocks * 512
        out[name] = total
    return out


def clean(base: Path) -> list[str]:
    """Remove every part of the cache; returns the names removed."""
    removed = []
    for name in SUBDIRS:
        if (base / name).exists():
            shutil.rmtree(base / name, ignore_errors=True)
            removed.append(name)
    return removed


# ---------------------------------------------------------------- checked entries


def crc_of(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of a file, read in chunks."""
    crc = 0
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def _sum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sum")


def _stamp(st: os.stat_result) -> list[int]:
    """What any write to a file changes: its size, mtime and ctime (a process cannot set
    a ctime), and which inode it is."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _write_record(path: Path, size: int, crc: int) -> None:
    stamp = _stamp(os.stat(path))
    write_atomic(_sum_path(path), json.dumps(
        {"size": size, "crc32": crc, "stamp": stamp}).encode())


def record(path: Path, crc: int | None = None) -> None:
    """Write the size-and-CRC record of a finished file (atomically, beside it);
    ``crc``: its CRC-32 as the writer computed it (the file is then not read again)."""
    if crc is None:
        size, crc = crc_of(path)
    else:
        size = path.stat().st_size
    _write_record(path, size, crc)


def write_checked(path: Path, data: bytes) -> Path:
    """Write ``data`` atomically with its record; returns ``path``."""
    write_atomic(path, data)
    _write_record(path, len(data), zlib.crc32(data))
    return path


def damage(path: Path) -> str | None:
    """Why a checked entry cannot be used (missing, no record, wrong size or CRC), or
    None when it is whole.

    The size is compared first: a truncation costs one stat. A file whose stamp (size,
    mtime, ctime, inode) is still the one recorded when it was written has not been
    written to since, and is not read again (the warm path stays in milliseconds: the
    unpacked kernel and a saved state are 60-100 MB each); any other file is read and
    its CRC compared, and when it matches the record takes the new stamp."""
    try:
        want = json.loads(_sum_path(path).read_text())
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "its record is unreadable"
    if st.st_size != want.get("size"):
        return f"{st.st_size} bytes instead of {want.get('size')}"
    if want.get("stamp") == _stamp(st):
        return None
    try:
        _, crc = crc_of(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if crc != want.get("crc32"):
        return "its content changed since it was written"
    with contextlib.suppress(OSError):
        _write_record(path, st.st_size, crc)  # copied or restored, but whole
    return None


def discard(path: Path) -> None:
    """Remove a checked entry and its record."""
    for victim in (path, _sum_path(path)):
        with contextlib.suppress(FileNotFoundError):
            victim.unlink()


def write_json(path: Path, value) -> None:
    """A small checked entry (a plan memo, a probe answer): JSON with its record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_checked(path, json.dumps(value).encode())


def read_json(path: Path, what: str):
    """A checked JSON entry, or None when it is missing or damaged (then it is removed,
    and one line says so)."""
    problem = damage(path)
    if problem == "missing":
        return None
    if problem is None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problem = f"unreadable: {exc}"
    print(f"hshelper: the cached {what} {path} was damaged ({problem}); making it again",
          file=sys.stderr)
    discard(path)
    return None


@contextlib.contextmanager
def locked(path: Path, shared: bool = False):
    """Hold ``path`` (a lock file, made when missing) locked for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
