"""hshelper.qemu.ramfile's pure parts against the real thing: CRCs against zlib, the
sparse copy against a real file with holes (its content, its allocated size); which
qemu versions can keep a saved state's RAM in a file."""

from __future__ import annotations

import os
import zlib

import pytest

from hshelper.qemu import ramfile, savedstate


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 8, 9, 100, 4096, 12345, 1 << 20,
                                   (1 << 20) + 5])
@pytest.mark.parametrize("start", [0, 0x12345678, zlib.crc32(b"abc")])
def test_crc_of_zeros_is_zlibs(count, start):
    assert ramfile.crc32_zeros(start, count) == zlib.crc32(bytes(count), start)


def test_nonzero_runs():
    page = 16
    data = bytes(page) + b"x" * page * 2 + bytes(page) + b"\0" * (page - 1) + b"y" + b"z"
    assert ramfile.nonzero_runs(data, page) == [(16, 32), (64, 17)]
    assert ramfile.nonzero_runs(bytes(64), page) == []


def test_copy_sparse_keeps_content_and_makes_zero_pages_holes(tmp_path):
    size = 8 << 20
    src = tmp_path / "live"
    with open(src, "wb") as fh:
        fh.truncate(size)
        fh.seek(1 << 20)
        fh.write(b"\1" * 4096 + bytes(64 << 10) + b"\2" * 100)  # data, zero pages, data
        fh.seek(5 << 20)
        fh.write(bytes(1 << 20))  # written zeros: data to SEEK_DATA, zeros to the copy
        fh.seek(size - 1)
        fh.write(b"\3")
    dest = tmp_path / "saved"
    with open(dest, "wb") as fh:  # as a state file is made: room for the RAM, a stream
        fh.truncate(size)
    with open(dest, "ab") as fh:
        fh.write(b"QEVM stream")
    fd, out = os.open(src, os.O_RDONLY), os.open(dest, os.O_RDWR)
    try:
        crc = ramfile.copy_sparse(fd, out, size)
        assert crc == zlib.crc32(src.read_bytes())
        crc = ramfile.crc_from(out, size, crc)
    finally:
        os.close(fd)
        os.close(out)
    content = dest.read_bytes()
    assert content == src.read_bytes() + b"QEVM stream"
    assert crc == zlib.crc32(content)
    # Three data pages (the last one's tail) at most, not the written megabyte of zeros.
    assert dest.stat().st_blocks * 512 <= 4 * 4096 + (64 << 10)


def test_live_ram_is_nameless_and_sized(tmp_path, monkeypatch):
    monkeypatch.setattr(ramfile, "LIVE_DIRS", ())
    before = set(os.listdir(tmp_path))
    fd = ramfile.live_ram(tmp_path, 1 << 20)
    try:
        assert os.fstat(fd).st_size == 1 << 20
        assert os.fstat(fd).st_nlink == 0  # nothing to clean up after a crash
    finally:
        os.close(fd)
    assert set(os.listdir(tmp_path)) == before


def test_qemu_opens_an_inherited_descriptor_by_its_proc_path(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.path.samefile(ramfile.fd_path(fd), path)
    finally:
        os.close(fd)


def test_live_ram_refuses_a_filesystem_without_room(tmp_path, monkeypatch):
    monkeypatch.setattr(ramfile, "LIVE_DIRS", ())
    with pytest.raises(OSError, match="no room"):
        ramfile.live_ram(tmp_path, 1 << 62)


@pytest.mark.parametrize("line, ok", [
    ("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)", True),
    ("QEMU emulator version 5.0.0", True),
    ("QEMU emulator version 4.2.1 (Debian 1:4.2-3ubuntu6)", False),
    ("QEMU emulator version 10.1.0", True),
    ("something else", True),  # unreadable: tried, and a failed restore boots cold
])
def test_which_qemu_can_keep_the_ram_in_a_file(line, ok):
    assert savedstate.new_enough(line) is ok
