"""Kernel formats: EFI zboot unpacked, gzip unpacked where qemu cannot, the rest booted
as is; and the checked cache entries the unpacked kernels are kept in."""

from __future__ import annotations

import gzip
import lzma
import struct

import pytest

from hshelper import cache
from hshelper.qemu import kernelfmt
from hshelper.qemu.kernelimage import bootable

IMAGE = bytearray(b"MZ" + b"\0" * 0x36 + kernelfmt.ARM64_MAGIC + b"\0" * 200 + b"kernel text")


def zboot(payload: bytes, comp: str) -> bytes:
    """An EFI zboot image laid out as Linux's zboot-header.S lays it out."""
    header = bytearray(0x100)
    header[0:2] = b"MZ"
    header[4:8] = b"zimg"
    struct.pack_into("<II", header, 8, len(header), len(payload))
    header[24:24 + len(comp)] = comp.encode()
    return bytes(header) + payload + struct.pack("<I", len(IMAGE))


@pytest.mark.parametrize("comp, pack", [
    ("gzip", gzip.compress),
    ("xz", lambda d: lzma.compress(d, check=lzma.CHECK_CRC32))])
def test_zboot_payload_is_unpacked(comp, pack):
    data, reason = kernelfmt.boot_image(zboot(pack(bytes(IMAGE)), comp), "arm64")
    assert data == IMAGE and comp in reason and "zboot" in reason


def test_zboot_with_a_format_nothing_here_unpacks_is_booted_as_is():
    data, reason = kernelfmt.boot_image(zboot(b"\x28\xb5\x2f\xfdjunk", "zstd"), "arm64")
    assert data is None and "cannot be unpacked" in reason


def test_plain_images_are_booted_as_they_are():
    assert kernelfmt.kind(bytes(IMAGE)) == "arm64-image"
    assert kernelfmt.boot_image(bytes(IMAGE), "arm64")[0] is None
    assert kernelfmt.boot_image(b"\x7fELF" + b"\0" * 100, "elf")[0] is None


def test_gzip_image_is_unpacked_for_riscv():
    data, reason = kernelfmt.boot_image(gzip.compress(bytes(IMAGE)), "riscv")
    assert data == IMAGE and "gunzipped" in reason


def test_unpacked_kernel_is_cached_checked_and_rebuilt_when_damaged(tmp_path, capsys):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(zboot(gzip.compress(bytes(IMAGE)), "gzip"))
    first = bootable(kernel, "arm64", tmp_path / "kernels")
    assert first.path != kernel and first.path.read_bytes() == IMAGE
    assert bootable(kernel, "arm64", tmp_path / "kernels").path == first.path
    with open(first.path, "r+b") as fh:  # one byte flipped, size unchanged
        fh.seek(5)
        fh.write(b"X")
    again = bootable(kernel, "arm64", tmp_path / "kernels")
    assert again.path.read_bytes() == IMAGE
    assert "was damaged (its content changed" in capsys.readouterr().err


def test_damage_is_size_first_then_crc(tmp_path):
    entry = cache.write_checked(tmp_path / "f", b"0123456789")
    assert cache.damage(entry) is None
    entry.write_bytes(b"01234")
    assert cache.damage(entry) == "5 bytes instead of 10"
    entry.write_bytes(b"0123456780")
    assert cache.damage(entry) == "its content changed since it was written"
    cache.discard(entry)
    assert cache.damage(entry) == "missing"


def test_a_damaged_json_entry_is_removed_and_said(tmp_path, capsys):
    entry = tmp_path / "plans" / "x"
    cache.write_json(entry, {"image": "abc", "watch": []})
    assert cache.read_json(entry, "image plan") == {"image": "abc", "watch": []}
    text = entry.read_bytes()
    entry.write_bytes(text.replace(b"abc", b"abd"))  # still JSON, not what was written
    assert cache.read_json(entry, "image plan") is None
    assert "the cached image plan" in capsys.readouterr().err and not entry.exists()
    assert cache.read_json(entry, "image plan") is None  # missing: silently None


def test_an_unwritten_entry_is_not_read_again_and_a_copied_one_is(tmp_path, monkeypatch):
    entry = cache.write_checked(tmp_path / "big", b"x" * 4096)
    reads = []
    monkeypatch.setattr(cache, "crc_of", lambda p: reads.append(p) or (4096, 0))
    assert cache.damage(entry) is None and reads == []  # stamp unchanged: no read
    copy = tmp_path / "copy"
    import shutil

    shutil.copy2(entry, copy)
    shutil.copy(entry.with_name("big.sum"), copy.with_name("copy.sum"))
    monkeypatch.undo()
    assert cache.damage(copy) is None  # another inode: read, CRC matches, re-recorded
    import os

    os.utime(copy, ns=(0, 0))  # a stamp change alone does not make it damaged
    assert cache.damage(copy) is None
