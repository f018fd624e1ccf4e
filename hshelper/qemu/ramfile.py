"""Guest RAM in files, for saved VM states.

A saved state file starts with the guest's RAM, as many bytes as the guest has memory
(sparse: pages of zeros are holes), and qemu's device state stream follows it. A
restored VM maps the RAM part copy-on-write (``share=off``: the file never changes)
and qemu's stream leaves the RAM out (the ``x-ignore-shared`` capability), so a restore
reads none of it up front: the guest faults in the pages it touches from the page
cache, which parallel restores of one state share. Loading the whole RAM from the
stream took 0.09 s of every restore here and up to 0.35 s after an idle spell (this
host is a VM whose free memory goes back to its hypervisor). One file, not two: it is
replaced in one rename, so no restore can pair one save's RAM with another's devices.

The VM that saves runs on a shared mapping of a nameless file (no file is left
behind however it ends), and its RAM is copied out while it is stopped for the save,
because it goes on to run its command in that memory. qemu opens both files as
``/proc/self/fd/N``: the very files hshelper opened and checked.
"""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

PAGE = 4096
CHUNK = 1 << 20
# Where a saving VM's RAM lives: tmpfs first (a disk file under a shared mapping was
# written back while the guest booted: the saving boot took 0.7 s longer).
LIVE_DIRS = (Path("/dev/shm"),)


def fd_path(fd: int) -> str:
    """The path through which qemu opens a descriptor it inherited (Linux's /proc)."""
    path = f"/proc/self/fd/{fd}"
    if not os.path.exists(path):
        raise OSError("/proc is not mounted: qemu could not open the guest's RAM file")
    return path


def live_ram(fallback_dir: Path, size: int) -> int:
    """A descriptor of a nameless, ``size``-byte file for a saving VM's RAM (qemu
    opens it as /proc/self/fd/N), in a filesystem with room for all of it: a guest
    that wrote past a full one would kill qemu with SIGBUS (a container's /dev/shm is
    often 64 MiB)."""
    for directory in (*LIVE_DIRS, fallback_dir):
        try:
            st = os.statvfs(directory)
            if st.f_bavail * st.f_frsize < size:
                continue
            fd = _nameless(directory)
        except OSError:
            continue
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            continue
        return fd
    raise OSError(f"no room for the guest's {size >> 20} MiB of RAM in "
                  f"{', '.join(map(str, (*LIVE_DIRS, fallback_dir)))}")


def _nameless(directory: Path) -> int:
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        # No O_TMPFILE here (older overlayfs): a name that lives for a moment.
        name = directory / f".hshelper-ram.{os.getpid()}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(name)
        return fd


def nonzero_runs(data: bytes | memoryview, page: int = PAGE) -> list[tuple[int, int]]:
    """(offset, length) of the runs of pages in ``data`` that are not all zero."""
    view = memoryview(data)
    zero = bytes(page)
    runs: list[tuple[int, int]] = []
    start = None
    for offset in range(0, len(view), page):
        if view[offset:offset + page] != zero[:len(view) - offset]:
            if start is None:
                start = offset
        elif start is not None:
            runs.append((start, offset - start))
            start = None
    if start is not None:
        runs.append((start, len(view) - start))
    return runs


def copy_sparse(src: int, dest: int, size: int) -> int:
    """Copy the first ``size`` bytes of the file open as ``src`` into the file open as
    ``dest`` (where they are holes so far) at the same offsets: pages of zeros stay
    holes (a third of a booted guest's touched memory here). Returns the CRC-32 of the
    ``size`` bytes, holes included, for the cache record (reading the file again for it
    took 0.5 s)."""
    crc = 0
    done = 0
    for start, end in _data_extents(src, size):
        crc = crc32_zeros(crc, start - done)
        for offset in range(start, end, CHUNK):
            chunk = os.pread(src, min(CHUNK, end - offset), offset)
            if len(chunk) != min(CHUNK, end - offset):
                raise OSError(f"short read of the guest's RAM at {offset}")
            crc = zlib.crc32(chunk, crc)
            view = memoryview(chunk)
            for run, length in nonzero_runs(view):
                os.pwrite(dest, view[run:run + length], offset + run)
        done = end
    return crc32_zeros(crc, size - done)


def crc_from(fd: int, offset: int, crc: int) -> int:
    """``crc`` continued over the file open as ``fd`` from ``offset`` to its end (the
    device state after the RAM)."""
    while chunk := os.pread(fd, CHUNK, offset):
        crc = zlib.crc32(chunk, crc)
        offset += len(chunk)
    return crc


# CRC-32 (zlib's) of zero bytes without reading them: appending a zero byte to a CRC's
# register is a linear map over GF(2), so n of them are that map to the nth power,
# found by squaring (as zlib's crc32_combine does). The RAM file is mostly holes.
_POLY = 0xEDB88320


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    row = 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_zeros(crc: int, count: int) -> int:
    """``zlib.crc32(bytes(count), crc)``, in time logarithmic in ``count``."""
    if count <= 0:
        return crc
    # The operator for one zero bit, then squared to one byte (8 bits).
    odd = [_POLY] + [1 << n for n in range(31)]
    even = _gf2_square(odd)  # two bits
    odd = _gf2_square(even)  # four bits
    register = crc ^ 0xFFFFFFFF
    while True:
        even = _gf2_square(odd)  # the operator for 8, 32, 128... bits; then odd
        if count & 1:
            register = _gf2_times(even, register)
        count >>= 1
        if not count:
            break
        odd = _gf2_square(even)
        if count & 1:
            register = _gf2_times(odd, register)
        count >>= 1
        if not count:
            break
    return register ^ 0xFFFFFFFF


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The file's data extents below ``size`` (all of it where SEEK_DATA is missing)."""
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            return [(0, size)]
        extents.append((data, hole))
        pos = hole
    return extents
